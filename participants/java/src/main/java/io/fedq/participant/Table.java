package io.fedq.participant;

import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStream;
import java.io.InputStreamReader;
import java.io.Reader;
import java.io.StringReader;
import java.math.BigDecimal;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.regex.Pattern;
import java.util.zip.GZIPInputStream;

/**
 * A CSV table read as docs/protocol.md section 5.1 says pandas reads it: missing-cell texts,
 * per-column type inference over the whole file, and each cell's canonical string.
 */
public final class Table {
    public enum Kind { INT, FLOAT, BOOL, TEXT }

    public static final Set<String> NA = Set.of("", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
            "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null");
    private static final Pattern INT = Pattern.compile("[+-]?[0-9]+");
    private static final Pattern FLOAT = Pattern.compile(
            "\\s*[+-]?(([0-9]+\\.?[0-9]*|\\.[0-9]+)([eE][+-]?[0-9]+)?|inf|Inf|INF|infinity|Infinity)\\s*");
    private static final Set<String> TRUE = Set.of("True", "TRUE", "true");
    private static final Set<String> FALSE = Set.of("False", "FALSE", "false");

    public final List<String> header;
    /** Cells by column, null where missing. */
    public final List<String[]> columns = new ArrayList<>();
    public final List<Kind> kinds = new ArrayList<>();
    public final int rows;

    private Table(List<String> header, List<List<String>> records) {
        this.header = header;
        this.rows = records.size();
        for (int c = 0; c < header.size(); c++) {
            String[] col = new String[rows];
            for (int r = 0; r < rows; r++) {
                List<String> rec = records.get(r);
                String v = c < rec.size() ? rec.get(c) : "";
                col[r] = NA.contains(v) ? null : v;
            }
            columns.add(col);
            kinds.add(infer(col));
        }
    }

    static Kind infer(String[] col) {
        boolean allInt = true;
        boolean allFloat = true;
        boolean allBool = true;
        boolean any = false;
        for (String v : col) {
            if (v == null) {
                continue;
            }
            any = true;
            allInt &= INT.matcher(v).matches();
            allFloat &= FLOAT.matcher(v).matches();
            allBool &= TRUE.contains(v) || FALSE.contains(v);
        }
        if (!any) {
            return Kind.FLOAT; // an empty column: all NaN
        }
        if (allInt) {
            return Kind.INT;
        }
        if (allFloat) {
            return Kind.FLOAT;
        }
        return allBool ? Kind.BOOL : Kind.TEXT;
    }

    public int column(String name) {
        return header.indexOf(name);
    }

    /** The canonical string of a filled cell (section 5.1). */
    public String canonical(int col, int row) {
        String v = columns.get(col)[row];
        switch (kinds.get(col)) {
            case BOOL:
                return TRUE.contains(v) ? "True" : "False";
            case INT:
                return new BigDecimal(v.startsWith("+") ? v.substring(1) : v).toBigInteger().toString();
            case FLOAT:
                return pythonStr(parseFloat(v));
            default:
                return v;
        }
    }

    static double parseFloat(String v) {
        String t = v.trim();
        String l = t.toLowerCase(java.util.Locale.ROOT);
        if (l.endsWith("inf") || l.endsWith("infinity")) {
            return t.startsWith("-") ? Double.NEGATIVE_INFINITY : Double.POSITIVE_INFINITY;
        }
        return Double.parseDouble(t);
    }

    /** Python's {@code str} of a float, with an integral value written as the integer's digits. */
    static String pythonStr(double x) {
        if (Double.isInfinite(x)) {
            return x > 0 ? "inf" : "-inf";
        }
        if (x == Math.rint(x)) {
            return new BigDecimal(x).toBigInteger().toString();
        }
        BigDecimal d = new BigDecimal(Double.toString(x)).stripTrailingZeros();
        double a = Math.abs(x);
        if (a >= 1e-4 && a < 1e16) {
            return d.toPlainString();
        }
        String digits = d.unscaledValue().abs().toString();
        int exp = digits.length() - 1 - d.scale();
        String mant = digits.length() == 1 ? digits : digits.charAt(0) + "." + digits.substring(1);
        return (x < 0 ? "-" : "") + mant + "e" + (exp < 0 ? "-" : "+") + (Math.abs(exp) < 10 ? "0" : "") + Math.abs(exp);
    }

    /** The numeric value of a filled cell (NaN where missing). */
    public double number(int col, int row) throws FedqException {
        String v = columns.get(col)[row];
        if (v == null) {
            return Double.NaN;
        }
        switch (kinds.get(col)) {
            case BOOL:
                return TRUE.contains(v) ? 1.0 : 0.0;
            case INT:
            case FLOAT:
                return parseFloat(v);
            default:
                if (!FLOAT.matcher(v).matches()) {
                    throw new FedqException("column " + header.get(col) + " is numeric in the task spec, but its cell "
                            + "'" + v + "' (row " + (row + 1) + ") is not a number");
                }
                return parseFloat(v);
        }
    }

    public static Table read(Path file) throws FedqException {
        String name = file.getFileName().toString().toLowerCase(java.util.Locale.ROOT);
        if (name.endsWith(".parquet") || name.endsWith(".pq")) {
            throw new FedqException("cannot read " + file + ": this client reads CSV (.csv, .csv.gz) only, not Parquet");
        }
        try (InputStream in = Files.newInputStream(file)) {
            InputStream body = name.endsWith(".gz") ? new GZIPInputStream(in) : in;
            return parse(new BufferedReader(new InputStreamReader(body, StandardCharsets.UTF_8)), file.toString());
        } catch (IOException e) {
            throw new FedqException("cannot read " + file + ": " + Bin.reason(e));
        }
    }

    public static Table parse(String csv) throws FedqException {
        try {
            return parse(new StringReader(csv), "the table");
        } catch (IOException e) {
            throw new FedqException("cannot read the table: " + e.getMessage());
        }
    }

    /** RFC 4180 CSV: comma separated, double quotes, quotes doubled inside; the first line the header. */
    static Table parse(Reader r, String where) throws IOException, FedqException {
        List<List<String>> records = new ArrayList<>();
        List<String> rec = new ArrayList<>();
        StringBuilder cell = new StringBuilder();
        boolean quoted = false;
        boolean any = false;
        int ch;
        while ((ch = r.read()) != -1) {
            char c = (char) ch;
            if (quoted) {
                if (c == '"') {
                    r.mark(1);
                    int next = r.read();
                    if (next == '"') {
                        cell.append('"');
                    } else {
                        quoted = false;
                        if (next == -1) {
                            break;
                        }
                        r.reset();
                    }
                } else {
                    cell.append(c);
                }
                continue;
            }
            if (c == '"') {
                quoted = true;
                any = true;
            } else if (c == ',') {
                rec.add(cell.toString());
                cell.setLength(0);
                any = true;
            } else if (c == '\n' || c == '\r') {
                if (c == '\r') {
                    r.mark(1);
                    if (r.read() != '\n') {
                        r.reset();
                    }
                }
                if (any || cell.length() > 0) {
                    rec.add(cell.toString());
                    records.add(rec);
                }
                rec = new ArrayList<>();
                cell.setLength(0);
                any = false;
            } else {
                cell.append(c);
                any = true;
            }
        }
        if (any || cell.length() > 0) {
            rec.add(cell.toString());
            records.add(rec);
        }
        if (records.isEmpty()) {
            throw new FedqException(where + " is empty (no header line)");
        }
        List<String> header = records.remove(0);
        Map<String, Integer> seen = new HashMap<>();
        for (String h : header) {
            if (seen.put(h, 1) != null) {
                throw new FedqException(where + ": column " + h + " appears twice in the header");
            }
        }
        return new Table(header, records);
    }
}
