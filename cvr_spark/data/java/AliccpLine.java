package cvrspark.data;

import java.util.ArrayList;
import java.util.Collections;
import java.util.HashMap;
import java.util.List;
import org.apache.spark.sql.Row;
import org.apache.spark.sql.RowFactory;
import org.apache.spark.sql.api.java.UDF2;

/**
 * One raw Ali-CCP line (skeleton or common features) parsed in one pass: the JVM twin of the
 * Spark SQL parser in {@code cvr_spark/data/aliccp_raw.py} ({@code _split_lines},
 * {@code _raw_list}, {@code raw_field_columns}), which stays the reference and the fallback.
 * {@code tests/test_aliccp_raw.py} checks that both give the same rows, on hand-picked damage
 * and on random lines.
 *
 * <p>Arguments: the line, and a spec {@code "<list column>;<single fields>;<multi fields>"}
 * (field names comma-separated, in the caller's order), e.g. {@code "5;205,206;109_14"}.
 *
 * <p>Returns {@code struct<ncols:int, head:array<string>, nfeat:int, bad:boolean,
 * single:array<string>, multi:array<array<string>>>}:
 * <ul>
 *   <li>{@code ncols}: the number of comma-separated columns ({@code size(split(line, ',', -1))});
 *   <li>{@code head}: the columns before the list column (null where the line is shorter);
 *   <li>{@code nfeat}: the number of {@code \x01}-separated features of the list column (0 for
 *       an empty list), {@code bad}: a feature is not {@code field \x02 feature_id \x03 number};
 *       both null when the line has no list column;
 *   <li>{@code single}: per single-valued field, the feature id of its first occurrence (null
 *       when absent); {@code multi}: per multi-valued field, every feature id in list order
 *       (null when the line has no list column).
 * </ul>
 * The values are those of a well-formed list (a line with {@code bad} is rejected by the
 * caller). Lines are Java strings here: Spark decodes bytes that are not UTF-8 to U+FFFD, and
 * the caller rejects such lines from their bytes ({@code is_valid_utf8}).
 */
public final class AliccpLine implements UDF2<String, String, Row> {
  private static final long serialVersionUID = 1L;

  private static final char FEATURE_SEP = '\u0001', ID_SEP = '\u0002', VALUE_SEP = '\u0003';

  /** A parsed spec; the last one is kept (every row of a query passes the same text). */
  private static final class Spec {
    final String text;
    final int listColumn, nSingles, nMultis;
    /** Field name -> its slot: single-valued fields 0 .. nSingles - 1, then the multi-valued. */
    final HashMap<String, Integer> slots = new HashMap<>();

    Spec(String text) {
      String[] p = text.split(";", -1);
      if (p.length != 3) {
        throw new IllegalArgumentException("AliccpLine spec must be '<list column>;<singles>;<multis>', got " + text);
      }
      this.text = text;
      listColumn = Integer.parseInt(p[0]);
      String[] singles = p[1].isEmpty() ? new String[0] : p[1].split(",", -1);
      String[] multis = p[2].isEmpty() ? new String[0] : p[2].split(",", -1);
      nSingles = singles.length;
      nMultis = multis.length;
      for (int i = 0; i < singles.length; i++) slots.putIfAbsent(singles[i], i);
      for (int i = 0; i < multis.length; i++) slots.putIfAbsent(multis[i], nSingles + i);
    }
  }

  private transient volatile Spec spec;

  private Spec spec(String text) {
    Spec s = spec;
    if (s == null || !s.text.equals(text)) {
      s = new Spec(text);
      spec = s;
    }
    return s;
  }

  private static boolean isDigit(char c) {
    return c >= '0' && c <= '9';
  }

  /** {@code s[from, to)} is {@code [-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?} (ASCII digits). */
  static boolean isNumber(String s, int from, int to) {
    int i = from;
    if (i < to && (s.charAt(i) == '+' || s.charAt(i) == '-')) i++;
    int digits = 0;
    while (i < to && isDigit(s.charAt(i))) { i++; digits++; }
    if (i < to && s.charAt(i) == '.') {
      i++;
      while (i < to && isDigit(s.charAt(i))) { i++; digits++; }
    }
    if (digits == 0) return false;
    if (i < to && (s.charAt(i) == 'e' || s.charAt(i) == 'E')) {
      i++;
      if (i < to && (s.charAt(i) == '+' || s.charAt(i) == '-')) i++;
      int exp = 0;
      while (i < to && isDigit(s.charAt(i))) { i++; exp++; }
      if (exp == 0) return false;
    }
    return i == to;
  }

  @Override
  public Row call(String line, String specText) {
    if (line == null) return null;
    Spec sp = spec(specText);
    int listColumn = sp.listColumn, len = line.length();
    String[] head = new String[listColumn];
    int ncols = 1, column = 0, start = 0, listStart = -1, listEnd = -1;
    for (int i = 0; i <= len; i++) {
      if (i == len || line.charAt(i) == ',') {
        if (column < listColumn) head[column] = line.substring(start, i);
        else if (column == listColumn) { listStart = start; listEnd = i; }
        if (i < len) ncols++;
        column++;
        start = i + 1;
      }
    }
    String[] singles = new String[sp.nSingles];
    List<List<String>> multis = sp.nMultis == 0 ? Collections.emptyList() : new ArrayList<>(sp.nMultis);
    for (int m = 0; m < sp.nMultis; m++) multis.add(listStart >= 0 ? new ArrayList<>() : null);
    Integer nfeat = null;
    Boolean bad = null;
    if (listStart >= 0) {
      int n = 0;
      boolean anyBad = false;
      for (int t = listStart; listEnd > listStart && t <= listEnd; ) {
        int e = line.indexOf(FEATURE_SEP, t);
        if (e < 0 || e > listEnd) e = listEnd;
        n++;
        // the feature [t, e): name \x02 id \x03 value, no separator inside a part
        int idSep = -1, valueSep = -1;
        boolean ok = true;
        for (int k = t; k < e && ok; k++) {
          char ch = line.charAt(k);
          if (ch == ID_SEP) { ok = idSep < 0 && valueSep < 0; idSep = k; }
          else if (ch == VALUE_SEP) { ok = idSep >= 0 && valueSep < 0; valueSep = k; }
        }
        ok = ok && idSep > t && valueSep > idSep + 1 && isNumber(line, valueSep + 1, e);
        if (!ok) {
          anyBad = true;
        } else {
          Integer slot = sp.slots.get(line.substring(t, idSep));
          if (slot == null) {
            // a field outside the preset
          } else if (slot < sp.nSingles) {
            if (singles[slot] == null) singles[slot] = line.substring(idSep + 1, valueSep);
          } else {
            multis.get(slot - sp.nSingles).add(line.substring(idSep + 1, valueSep));
          }
        }
        t = e + 1;
      }
      nfeat = n;
      bad = anyBad;
    }
    return RowFactory.create(ncols, head, nfeat, bad, singles, multis);
  }
}
