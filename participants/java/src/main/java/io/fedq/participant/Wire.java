package io.fedq.participant;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.TreeMap;
import java.util.regex.Pattern;
import org.msgpack.core.MessageBufferPacker;
import org.msgpack.core.MessageFormat;
import org.msgpack.core.MessagePack;
import org.msgpack.core.MessageUnpacker;
import org.msgpack.value.Value;
import org.msgpack.value.ValueType;

/** Envelopes, content hash and signing messages of docs/wire-format.md (format version 1). */
public final class Wire {
    private Wire() {}

    public static final Pattern NAME = Pattern.compile("[A-Za-z0-9][A-Za-z0-9_-]{0,63}");
    public static final Pattern UPDATE_ID = Pattern.compile("[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}");
    public static final long MAX_MESSAGE = 64L << 20;
    /** The 12 bytes every chunk message begins with (docs/chunking.md section 1). */
    public static final byte[] CHUNK_MAGIC = Bin.unhex("99aa666564712d6368756e6b");

    // ------------------------------------------------------------------ content hash

    /** Section 8: SHA-256 over the domain and, per tensor, its header and raw bytes. */
    public static byte[] contentHash(List<Tensor> tensors) {
        Bin.Writer w = new Bin.Writer().bytes(Bin.utf8("fedq-tensors-v1\0"));
        for (Tensor t : tensors) {
            byte[] name = Bin.utf8(t.name);
            w.u32(name.length).bytes(name).u8(3).bytes(Bin.utf8("f32")).u8(t.shape.length);
            for (long d : t.shape) {
                w.u64(d);
            }
            w.u64(4L * t.data.length).bytes(Bin.floatsLE(t.data));
        }
        return Bin.sha256(w.toBytes());
    }

    // ---------------------------------------------------------------- the update

    /** An update envelope (section 3) as this participant fills it. */
    public static final class Update {
        public String task;
        public String participant;
        public String id;
        public long baseVersion;
        public long samples;
        public Map<String, Double> metrics = new LinkedHashMap<>();
        public String codec = "raw";
        public List<Tensor> tensors = new ArrayList<>();
        /** Each tensor's payload {@code b} under {@link #codec}. */
        public List<byte[]> payloads = new ArrayList<>();
        /** The content hash of the decoded tensors. */
        public byte[] hash;
        public Double createdAt;
        public byte[] specHash;
        public byte[] signature;
    }

    public static byte[] encodeUpdate(Update u) {
        try (MessageBufferPacker pk = MessagePack.newDefaultBufferPacker()) {
            int entries = 11 + (u.createdAt != null ? 1 : 0) + (u.specHash != null ? 1 : 0) + (u.signature != null ? 1 : 0);
            pk.packMapHeader(entries);
            pk.packString("fv").packInt(1);
            pk.packString("k").packString("u");
            pk.packString("t").packString(u.task);
            pk.packString("p").packString(u.participant);
            pk.packString("id").packString(u.id);
            pk.packString("bv").packLong(u.baseVersion);
            pk.packString("n").packLong(u.samples);
            pk.packString("m").packMapHeader(u.metrics.size());
            for (Map.Entry<String, Double> e : u.metrics.entrySet()) {
                pk.packString(e.getKey()).packDouble(e.getValue());
            }
            pk.packString("c").packString(u.codec);
            pk.packString("ts").packArrayHeader(u.tensors.size());
            for (int i = 0; i < u.tensors.size(); i++) {
                Tensor t = u.tensors.get(i);
                pk.packMapHeader(4);
                pk.packString("n").packString(t.name);
                pk.packString("d").packString("f32");
                pk.packString("s").packArrayHeader(t.shape.length);
                for (long d : t.shape) {
                    pk.packLong(d);
                }
                byte[] b = u.payloads.get(i);
                pk.packString("b").packBinaryHeader(b.length);
                pk.writePayload(b);
            }
            pk.packString("h").packBinaryHeader(32);
            pk.writePayload(u.hash);
            if (u.createdAt != null) {
                pk.packString("at").packDouble(u.createdAt);
            }
            if (u.specHash != null) {
                pk.packString("sh").packBinaryHeader(u.specHash.length);
                pk.writePayload(u.specHash);
            }
            if (u.signature != null) {
                pk.packString("sg").packBinaryHeader(u.signature.length);
                pk.writePayload(u.signature);
            }
            return pk.toByteArray();
        } catch (IOException e) {
            throw new IllegalStateException("msgpack packer failed", e);
        }
    }

    // ------------------------------------------------------------ signing messages

    public static byte[] metricsDigest(Map<String, Double> metrics) {
        TreeMap<String, Double> sorted = new TreeMap<>(Wire::compareUtf8);
        sorted.putAll(metrics);
        Bin.Writer w = new Bin.Writer().u16(sorted.size());
        for (Map.Entry<String, Double> e : sorted.entrySet()) {
            w.text(e.getKey()).f64(e.getValue());
        }
        return Bin.sha256(w.toBytes());
    }

    static int compareUtf8(String a, String b) {
        return Arrays.compareUnsigned(Bin.utf8(a), Bin.utf8(b));
    }

    /** Section 15: the update's signing message (an update without {@code sa}). */
    public static byte[] updateSigningMessage(String t, String p, String id, long bv, long n, byte[] h, byte[] sh,
                                              Map<String, Double> metrics) {
        return new Bin.Writer().bytes(Bin.utf8("fedq-update-sig-v1\0")).text(t).text(p).text(id).u64(bv).u64(n)
                .bytes(h).bytes(sh).bytes(metricsDigest(metrics)).toBytes();
    }

    public static byte[] modelSigningMessage(String t, long v, byte[] vh, byte[] h, byte[] sh, List<byte[]> anc) {
        Bin.Writer w = new Bin.Writer().bytes(Bin.utf8("fedq-model-sig-v1\0")).text(t).u64(v).bytes(vh).bytes(h)
                .bytes(sh).u16(anc.size());
        for (byte[] a : anc) {
            w.bytes(a);
        }
        return w.toBytes();
    }

    public static byte[] receiptSigningMessage(String t, String p, String id, String outcome, long version,
                                               double weight, String reason) {
        return new Bin.Writer().bytes(Bin.utf8("fedq-receipt-sig-v1\0")).text(t).text(p).text(id).text(outcome)
                .u64(version).f64(weight).text(reason).toBytes();
    }

    // ------------------------------------------------------------------ decoding

    /** A decoded model envelope (section 4). */
    public static final class Model {
        public String task;
        public long version;
        public byte[] versionHash = new byte[0];
        public String codec;
        public List<Tensor> tensors = new ArrayList<>();
        public byte[] hash;
        public byte[] specHash;
        public List<byte[]> ancestors = new ArrayList<>();
        public byte[] signature;
    }

    /** A decoded receipt (section 11a). */
    public static final class Receipt {
        public String task;
        public String participant;
        public String id;
        public String outcome;
        public long version;
        public double weight;
        public String reason = "";
        public String detail = "";
        public double at;
        public byte[] signature;
    }

    /** The top-level map of one msgpack object, keys checked (str, unique), no trailing bytes. */
    static Map<String, Value> topMap(byte[] body, long limit) throws WireException {
        if (body.length > limit) {
            throw new WireException("too_large", body.length + " bytes, the limit is " + limit);
        }
        checkLengths(body);
        Value v;
        try (MessageUnpacker up = MessagePack.newDefaultUnpacker(body)) {
            v = up.unpackValue();
            if (up.hasNext()) {
                throw new WireException("malformed", "trailing bytes after the msgpack object");
            }
        } catch (IOException | RuntimeException e) {
            throw new WireException("malformed", "not one msgpack object");
        }
        checkNoExt(v);
        if (!v.isMapValue()) {
            throw new WireException("malformed", "the top level is not a map");
        }
        Map<String, Value> out = new LinkedHashMap<>();
        Value[] kv = v.asMapValue().getKeyValueArray();
        Set<String> seen = new HashSet<>();
        List<String> binKeys = new ArrayList<>();
        for (int i = 0; i < kv.length; i += 2) {
            if (!kv[i].isStringValue()) {
                binKeys.add(kv[i].toString());
                continue;
            }
            String k = str(kv[i]);
            if (!seen.add(k)) {
                throw new WireException("malformed", "key " + k + " repeated");
            }
            out.put(k, kv[i + 1]);
        }
        if (!binKeys.isEmpty()) {
            out.put("\u0000bin-key", null);
        }
        return out;
    }

    /** How deep arrays and maps may nest in a message. */
    static final int MAX_DEPTH = 64;

    /**
     * Walks one msgpack object by its headers, before anything is unpacked, and refuses (malformed) a
     * str, bin or ext longer than the bytes that remain, an array or map with more entries than could
     * fit in them, nesting deeper than {@link #MAX_DEPTH}, or trailing bytes: msgpack-core allocates
     * whatever length a header declares.
     */
    static void checkLengths(byte[] body) throws WireException {
        try (MessageUnpacker up = MessagePack.newDefaultUnpacker(body)) {
            walk(up, body.length, 0);
            if (up.hasNext()) {
                throw new WireException("malformed", "trailing bytes after the msgpack object");
            }
        } catch (IOException | RuntimeException e) {
            throw new WireException("malformed", "not one msgpack object");
        }
    }

    private static void walk(MessageUnpacker up, long size, int depth) throws IOException, WireException {
        if (depth > MAX_DEPTH) {
            throw new WireException("malformed", "arrays or maps nested deeper than " + MAX_DEPTH);
        }
        if (!up.hasNext()) {
            throw new WireException("malformed", "not one msgpack object");
        }
        MessageFormat f = up.getNextFormat();
        switch (f.getValueType()) {
            case STRING: {
                int n = up.unpackRawStringHeader();
                payload(up, size, n);
                break;
            }
            case BINARY: {
                int n = up.unpackBinaryHeader();
                payload(up, size, n);
                break;
            }
            case EXTENSION: {
                int n = up.unpackExtensionTypeHeader().getLength();
                payload(up, size, n);
                break;
            }
            case ARRAY: {
                int n = up.unpackArrayHeader();
                if (n < 0 || n > size - up.getTotalReadBytes()) {
                    throw new WireException("malformed", "an array declares " + n + " items, more than the message holds");
                }
                for (int i = 0; i < n; i++) {
                    walk(up, size, depth + 1);
                }
                break;
            }
            case MAP: {
                int n = up.unpackMapHeader();
                if (n < 0 || 2L * n > size - up.getTotalReadBytes()) {
                    throw new WireException("malformed", "a map declares " + n + " entries, more than the message holds");
                }
                for (int i = 0; i < 2 * n; i++) {
                    walk(up, size, depth + 1);
                }
                break;
            }
            default:
                up.skipValue();
        }
    }

    private static void payload(MessageUnpacker up, long size, int n) throws IOException, WireException {
        if (n < 0 || n > size - up.getTotalReadBytes()) {
            throw new WireException("malformed", "a str, bin or ext declares " + Integer.toUnsignedString(n)
                    + " bytes, more than the message holds");
        }
        up.readPayloadAsReference(n);
    }

    static void checkNoExt(Value v) throws WireException {
        if (v.isExtensionValue()) {
            throw new WireException("malformed", "ext type");
        }
        if (v.isArrayValue()) {
            for (Value x : v.asArrayValue()) {
                checkNoExt(x);
            }
        } else if (v.isMapValue()) {
            for (Value x : v.asMapValue().getKeyValueArray()) {
                checkNoExt(x);
            }
        }
    }

    static String str(Value v) throws WireException {
        try {
            return StandardCharsets.UTF_8.newDecoder().onMalformedInput(CodingErrorAction.REPORT)
                    .onUnmappableCharacter(CodingErrorAction.REPORT)
                    .decode(ByteBuffer.wrap(v.asRawValue().asByteArray())).toString();
        } catch (CharacterCodingException e) {
            throw new WireException("malformed", "invalid UTF-8 in a str");
        }
    }

    static void header(Map<String, Value> m, String kind, Set<String> allowed, Set<String> required)
            throws WireException {
        Value fv = m.get("fv");
        if (fv == null || fv.getValueType() != ValueType.INTEGER || !fv.asIntegerValue().isInLongRange()
                || fv.asIntegerValue().toLong() != 1) {
            throw new WireException("unsupported_version", "fv is not 1");
        }
        Value k = m.get("k");
        if (k == null || !k.isStringValue() || !str(k).equals(kind)) {
            throw new WireException("wrong_kind", "k is not " + kind);
        }
        for (String key : m.keySet()) {
            if (!allowed.contains(key)) {
                throw new WireException("unknown_field", key.startsWith("\u0000") ? "a bin key" : key);
            }
        }
        for (String key : required) {
            if (!m.containsKey(key)) {
                throw new WireException("missing_field", key);
            }
        }
    }

    static String name(Map<String, Value> m, String key, Pattern rule) throws WireException {
        Value v = m.get(key);
        if (!v.isStringValue() || !rule.matcher(str(v)).matches()) {
            throw new WireException("invalid_field", key);
        }
        return str(v);
    }

    static long nonNeg(Map<String, Value> m, String key, long min) throws WireException {
        Value v = m.get(key);
        if (v.getValueType() != ValueType.INTEGER || !v.asIntegerValue().isInLongRange()
                || v.asIntegerValue().toLong() < min) {
            throw new WireException("invalid_field", key);
        }
        return v.asIntegerValue().toLong();
    }

    static byte[] bin(Map<String, Value> m, String key, int len, int maxLen) throws WireException {
        Value v = m.get(key);
        if (v.getValueType() != ValueType.BINARY) {
            throw new WireException("invalid_field", key + " is not bin");
        }
        byte[] b = v.asBinaryValue().asByteArray();
        if ((len >= 0 && b.length != len) || b.length > maxLen) {
            throw new WireException("invalid_field", key + " has " + b.length + " bytes");
        }
        return b;
    }

    static double real(Value v, String key) throws WireException {
        if (v.getValueType() == ValueType.FLOAT) {
            return v.asFloatValue().toDouble();
        }
        if (v.getValueType() == ValueType.INTEGER) {
            return v.asIntegerValue().toDouble();
        }
        throw new WireException("invalid_field", key + " is not a number");
    }

    private static final Set<String> MODEL_KEYS = Set.of("fv", "k", "t", "v", "vh", "c", "ts", "h", "sh", "anc", "sg");
    private static final Set<String> MODEL_REQUIRED = Set.of("fv", "k", "t", "v", "c", "ts", "h");

    /**
     * Decodes a model envelope and checks it against the task's model: {@code names} and
     * {@code shapes} in order (f32 only), codec {@code raw} or {@code zstd}, the content hash,
     * finite values.
     */
    public static Model decodeModel(byte[] body, List<String> names, List<long[]> shapes) throws WireException {
        Map<String, Value> m = topMap(body, Math.max(MAX_MESSAGE, 0));
        header(m, "m", MODEL_KEYS, MODEL_REQUIRED);
        Model out = new Model();
        out.task = name(m, "t", NAME);
        out.version = nonNeg(m, "v", 0);
        if (m.containsKey("vh")) {
            out.versionHash = bin(m, "vh", -1, 32);
            if (out.versionHash.length != 0 && out.versionHash.length != 32) {
                throw new WireException("invalid_field", "vh");
            }
        }
        if (m.containsKey("sh")) {
            out.specHash = bin(m, "sh", 32, 32);
        }
        if (m.containsKey("anc")) {
            Value a = m.get("anc");
            if (!a.isArrayValue() || a.asArrayValue().size() > 64) {
                throw new WireException("invalid_field", "anc");
            }
            for (Value x : a.asArrayValue()) {
                if (x.getValueType() != ValueType.BINARY || x.asBinaryValue().asByteArray().length != 32) {
                    throw new WireException("invalid_field", "anc");
                }
                out.ancestors.add(x.asBinaryValue().asByteArray());
            }
        }
        if (m.containsKey("sg")) {
            out.signature = bin(m, "sg", -1, 256);
        }
        Value c = m.get("c");
        if (!c.isStringValue()) {
            throw new WireException("invalid_field", "c");
        }
        out.codec = str(c);
        if (!out.codec.equals("raw") && !out.codec.equals("zstd")) {
            throw new WireException("unknown_codec", out.codec + " (a model envelope is raw or zstd)");
        }
        out.hash = bin(m, "h", 32, 32);
        Value ts = m.get("ts");
        if (!ts.isArrayValue()) {
            throw new WireException("invalid_field", "ts is not an array");
        }
        List<Value> entries = ts.asArrayValue().list();
        if (entries.size() > 4096) {
            throw new WireException("too_many_tensors", entries.size() + " tensors");
        }
        if (entries.size() != names.size()) {
            throw new WireException("tensor_mismatch", entries.size() + " tensors, the model has " + names.size());
        }
        List<byte[]> payloads = new ArrayList<>();
        Set<String> seen = new HashSet<>();
        for (int i = 0; i < entries.size(); i++) {
            Value e = entries.get(i);
            if (!e.isMapValue() || e.asMapValue().size() != 4) {
                throw new WireException("invalid_tensor", "entry " + i + " is not a map of n, d, s, b");
            }
            Map<String, Value> t = new LinkedHashMap<>();
            for (Map.Entry<Value, Value> kv : e.asMapValue().entrySet()) {
                if (!kv.getKey().isStringValue()) {
                    throw new WireException("invalid_tensor", "entry " + i + " has a non-str key");
                }
                t.put(str(kv.getKey()), kv.getValue());
            }
            if (!t.keySet().equals(Set.of("n", "d", "s", "b"))) {
                throw new WireException("invalid_tensor", "entry " + i + " keys " + t.keySet());
            }
            if (!t.get("n").isStringValue()) {
                throw new WireException("invalid_tensor", "entry " + i + " name is not a str");
            }
            String n = str(t.get("n"));
            if (n.isEmpty() || n.codePointCount(0, n.length()) > 256) {
                throw new WireException("invalid_tensor", "bad name");
            }
            if (!t.get("d").isStringValue()) {
                throw new WireException("bad_dtype", "d is not a str");
            }
            String d = str(t.get("d"));
            if (!List.of("f16", "bf16", "f32", "f64", "i8", "u8", "i16", "i32", "i64", "bool").contains(d)) {
                throw new WireException("bad_dtype", d);
            }
            Value s = t.get("s");
            if (!s.isArrayValue() || s.asArrayValue().size() > 8) {
                throw new WireException("bad_shape", "s of " + n);
            }
            long[] shape = new long[s.asArrayValue().size()];
            for (int j = 0; j < shape.length; j++) {
                Value x = s.asArrayValue().get(j);
                if (x.getValueType() != ValueType.INTEGER || !x.asIntegerValue().isInLongRange()
                        || x.asIntegerValue().toLong() < 0 || x.asIntegerValue().toLong() >= (1L << 32)) {
                    throw new WireException("bad_shape", "s of " + n);
                }
                shape[j] = x.asIntegerValue().toLong();
            }
            if (t.get("b").getValueType() != ValueType.BINARY) {
                throw new WireException("invalid_tensor", "b of " + n + " is not bin");
            }
            if (!seen.add(n)) {
                throw new WireException("invalid_tensor", "name " + n + " repeated");
            }
            if (!n.equals(names.get(i)) || !d.equals("f32") || !Arrays.equals(shape, shapes.get(i))) {
                throw new WireException("tensor_mismatch", "tensor " + i + " is " + n + " " + d + " "
                        + Arrays.toString(shape) + ", the model has " + names.get(i) + " f32 "
                        + Arrays.toString(shapes.get(i)));
            }
            payloads.add(t.get("b").asBinaryValue().asByteArray());
        }
        for (int i = 0; i < payloads.size(); i++) {
            out.tensors.add(new Tensor(names.get(i), shapes.get(i), Codecs.decode(out.codec, payloads.get(i), shapes.get(i))));
        }
        if (!Arrays.equals(contentHash(out.tensors), out.hash)) {
            throw new WireException("hash_mismatch", "the content hash differs from h");
        }
        for (Tensor t : out.tensors) {
            for (float f : t.data) {
                if (!Float.isFinite(f)) {
                    throw new WireException("non_finite", "tensor " + t.name + " holds NaN or Inf");
                }
            }
        }
        return out;
    }

    private static final Set<String> RECEIPT_KEYS = Set.of("fv", "k", "t", "p", "id", "o", "v", "w", "r", "d", "at", "sg");

    /** Decodes a receipt (section 11a); at most 64 KiB. */
    public static Receipt decodeReceipt(byte[] body) throws WireException {
        Map<String, Value> m = topMap(body, 64 * 1024);
        header(m, "r", RECEIPT_KEYS, Set.of("fv", "k", "t", "p", "id", "o", "at"));
        Receipt r = new Receipt();
        r.task = name(m, "t", NAME);
        r.participant = name(m, "p", NAME);
        r.id = name(m, "id", UPDATE_ID);
        Value o = m.get("o");
        r.outcome = o.isStringValue() ? str(o) : "";
        if (r.outcome.equals("accepted")) {
            for (String k : List.of("r", "d")) {
                if (m.containsKey(k)) {
                    throw new WireException("unknown_field", k + " on an accepted receipt");
                }
            }
            for (String k : List.of("v", "w")) {
                if (!m.containsKey(k)) {
                    throw new WireException("missing_field", k);
                }
            }
            r.version = nonNeg(m, "v", 0);
            if (m.get("w").getValueType() != ValueType.FLOAT) {
                throw new WireException("invalid_field", "w is not a float");
            }
            r.weight = m.get("w").asFloatValue().toDouble();
        } else if (r.outcome.equals("refused")) {
            for (String k : List.of("v", "w")) {
                if (m.containsKey(k)) {
                    throw new WireException("unknown_field", k + " on a refused receipt");
                }
            }
            for (String k : List.of("r", "d")) {
                if (!m.containsKey(k) || !m.get(k).isStringValue()) {
                    throw new WireException(m.containsKey(k) ? "invalid_field" : "missing_field", k);
                }
            }
            r.reason = str(m.get("r"));
            r.detail = str(m.get("d"));
        } else {
            throw new WireException("invalid_field", "o");
        }
        r.at = real(m.get("at"), "at");
        if (m.containsKey("sg")) {
            r.signature = bin(m, "sg", -1, 256);
        }
        return r;
    }

    /** The top-level {@code k} of a msgpack map, or null (receipt queues also carry unmask requests). */
    public static String peekKind(byte[] body) {
        try {
            Map<String, Value> m = topMap(body, MAX_MESSAGE);
            Value k = m.get("k");
            return k != null && k.isStringValue() ? str(k) : null;
        } catch (WireException e) {
            return null;
        }
    }

    public static boolean isChunk(byte[] body) {
        return body.length >= CHUNK_MAGIC.length
                && Arrays.equals(Arrays.copyOf(body, CHUNK_MAGIC.length), CHUNK_MAGIC);
    }
}
