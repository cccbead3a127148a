package io.fedq.participant;

import com.github.luben.zstd.Zstd;
import java.io.ByteArrayOutputStream;
import java.util.ArrayList;
import java.util.Comparator;
import java.util.List;
import java.util.Random;

/**
 * The codecs of docs/wire-format.md section 6 for float32 tensors: {@code raw}, {@code zstd}
 * and the lossy codecs of section 6.1 (fedq's encoder rules), each with its decoder.
 */
public final class Codecs {
    private Codecs() {}

    public static final List<String> LOSSY = List.of("f16", "bf16", "int8", "int8c", "topk", "topk8");

    /** An encoded payload and the float32 values a decoder rebuilds from it. */
    public static final class Encoded {
        public final byte[] payload;
        public final float[] decoded;

        Encoded(byte[] payload, float[] decoded) {
            this.payload = payload;
            this.decoded = decoded;
        }
    }

    public static boolean known(String codec) {
        if (codec.equals("raw") || codec.equals("zstd")) {
            return true;
        }
        String base = codec.endsWith("+zstd") ? codec.substring(0, codec.length() - 5) : codec;
        return LOSSY.contains(base);
    }

    /**
     * Encodes one float32 tensor. {@code fraction} is the task's topk_fraction (topk, topk8);
     * {@code rng} non-null turns on stochastic rounding (int8, int8c, topk8).
     */
    public static Encoded encode(String codec, float[] x, long[] shape, double fraction, Random rng) {
        if (codec.equals("raw")) {
            return new Encoded(Bin.floatsLE(x), x.clone());
        }
        if (codec.equals("zstd")) {
            return new Encoded(Zstd.compress(Bin.floatsLE(x), 3), x.clone());
        }
        boolean z = codec.endsWith("+zstd");
        String base = z ? codec.substring(0, codec.length() - 5) : codec;
        Encoded p;
        switch (base) {
            case "f16": p = f16(x); break;
            case "bf16": p = bf16(x); break;
            case "int8": p = int8(x, 1, rng); break;
            case "int8c": p = int8(x, rows(shape, x.length), rng); break;
            case "topk": p = topk(x, fraction, false, rng); break;
            case "topk8": p = topk(x, fraction, true, rng); break;
            default: throw new IllegalArgumentException("unknown codec " + codec);
        }
        if (!z) {
            return p;
        }
        byte[] body = base.equals("f16") || base.equals("bf16") ? shuffle(p.payload, 2) : p.payload;
        return new Encoded(Zstd.compress(body, 3), p.decoded);
    }

    static int rows(long[] shape, int n) {
        return shape.length >= 2 && n >= 1 ? (int) shape[0] : 1;
    }

    // ---------------------------------------------------------------- half floats

    /** float32 to binary16 bits, round to nearest even; the caller clamps to +-65504. */
    public static int floatToHalf(float f) {
        int bits = Float.floatToRawIntBits(f);
        int sign = (bits >>> 16) & 0x8000;
        int abs = bits & 0x7fffffff;
        if (abs < 0x38800000) { // below binary16's smallest normal, 2^-14: a subnormal (or 0)
            double units = Math.rint((double) Float.intBitsToFloat(abs) * 16777216.0); // 2^24
            return sign | (int) units;
        }
        int exp = (abs >>> 23) - 127 + 15;
        int mant = abs & 0x7fffff;
        int h = (exp << 10) | (mant >>> 13);
        int rem = mant & 0x1fff;
        if (rem > 0x1000 || (rem == 0x1000 && (h & 1) == 1)) {
            h++;
        }
        return sign | h;
    }

    public static float halfToFloat(int h) {
        int sign = (h & 0x8000) << 16;
        int exp = (h >>> 10) & 0x1f;
        int mant = h & 0x3ff;
        if (exp == 0) {
            float v = (float) (mant * Math.pow(2, -24));
            return sign != 0 ? -v : v;
        }
        if (exp == 31) {
            return Float.intBitsToFloat(sign | 0x7f800000 | (mant << 13));
        }
        return Float.intBitsToFloat(sign | ((exp - 15 + 127) << 23) | (mant << 13));
    }

    static Encoded f16(float[] x) {
        byte[] out = new byte[2 * x.length];
        float[] dec = new float[x.length];
        for (int i = 0; i < x.length; i++) {
            float v = Math.max(-65504f, Math.min(65504f, x[i]));
            int h = floatToHalf(v);
            out[2 * i] = (byte) h;
            out[2 * i + 1] = (byte) (h >>> 8);
            dec[i] = halfToFloat(h);
        }
        return new Encoded(out, dec);
    }

    static Encoded bf16(float[] x) {
        byte[] out = new byte[2 * x.length];
        float[] dec = new float[x.length];
        for (int i = 0; i < x.length; i++) {
            long u = Float.floatToRawIntBits(x[i]) & 0xffffffffL;
            int r = (int) (((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff);
            if (r == 0x7f80) {
                r = 0x7f7f;
            } else if (r == 0xff80) {
                r = 0xff7f;
            }
            out[2 * i] = (byte) r;
            out[2 * i + 1] = (byte) (r >>> 8);
            dec[i] = Float.intBitsToFloat(r << 16);
        }
        return new Encoded(out, dec);
    }

    static int level(float x, float s, Random rng) {
        if (s == 0f) {
            return 0;
        }
        float ratio = x / s;
        double q = rng == null ? Math.rint(ratio) : Math.floor(ratio + rng.nextDouble());
        return (int) Math.max(-127, Math.min(127, q));
    }

    static float scaleOf(float[] x, int from, int to) {
        float m = 0f;
        for (int i = from; i < to; i++) {
            m = Math.max(m, Math.abs(x[i]));
        }
        return m / 127f;
    }

    static Encoded int8(float[] x, int r, Random rng) {
        int n = x.length;
        Bin.Writer w = new Bin.Writer();
        float[] dec = new float[n];
        float[] scales = new float[r];
        int per = r == 0 ? 0 : n / r;
        for (int j = 0; j < r; j++) {
            scales[j] = scaleOf(x, j * per, (j + 1) * per);
            w.f32(scales[j]);
        }
        byte[] q = new byte[n];
        for (int i = 0; i < n; i++) {
            float s = scales[per == 0 ? 0 : i / per];
            int l = level(x[i], s, rng);
            q[i] = (byte) l;
            dec[i] = l * s;
        }
        w.bytes(q);
        return new Encoded(w.toBytes(), dec);
    }

    static void varint(ByteArrayOutputStream out, long v) {
        while (v >= 0x80) {
            out.write((int) (v & 0x7f) | 0x80);
            v >>>= 7;
        }
        out.write((int) v);
    }

    static Encoded topk(float[] x, double fraction, boolean eight, Random rng) {
        int n = x.length;
        int k = n == 0 ? 0 : (int) Math.max(1, Math.min(n, Math.rint(fraction * n)));
        List<Integer> idx = new ArrayList<>(n);
        for (int i = 0; i < n; i++) {
            idx.add(i);
        }
        idx.sort(Comparator.<Integer>comparingDouble(i -> -Math.abs(x[i])).thenComparingInt(i -> i));
        int[] keep = new int[k];
        for (int j = 0; j < k; j++) {
            keep[j] = idx.get(j);
        }
        java.util.Arrays.sort(keep);
        float[] vals = new float[k];
        for (int j = 0; j < k; j++) {
            vals[j] = x[keep[j]];
        }
        Bin.Writer w = new Bin.Writer();
        w.u32(k);
        float[] dec = new float[n];
        if (eight) {
            float s = scaleOf(vals, 0, k);
            w.f32(s);
            byte[] q = new byte[k];
            for (int j = 0; j < k; j++) {
                int l = level(vals[j], s, rng);
                q[j] = (byte) l;
                dec[keep[j]] = l * s;
            }
            w.bytes(q);
        } else {
            for (int j = 0; j < k; j++) {
                w.f32(vals[j]);
                dec[keep[j]] = vals[j];
            }
        }
        ByteArrayOutputStream gaps = new ByteArrayOutputStream();
        for (int j = 0; j < k; j++) {
            varint(gaps, j == 0 ? keep[0] : keep[j] - keep[j - 1] - 1);
        }
        w.bytes(gaps.toByteArray());
        return new Encoded(w.toBytes(), dec);
    }

    static byte[] shuffle(byte[] p, int width) {
        int n = p.length / width;
        byte[] out = new byte[p.length];
        for (int i = 0; i < n; i++) {
            for (int b = 0; b < width; b++) {
                out[b * n + i] = p[i * width + b];
            }
        }
        return out;
    }

    static byte[] unshuffle(byte[] p, int width) {
        int n = p.length / width;
        byte[] out = new byte[p.length];
        for (int i = 0; i < n; i++) {
            for (int b = 0; b < width; b++) {
                out[i * width + b] = p[b * n + i];
            }
        }
        return out;
    }

    // ------------------------------------------------------------------- decoding

    /** One zstd frame holding exactly {@code size} bytes (at most {@code size} when {@code atMost}). */
    static byte[] unzstd(byte[] frame, long size, boolean atMost) throws WireException {
        long declared;
        try {
            declared = Zstd.decompressedSize(frame);
        } catch (RuntimeException e) {
            throw new WireException("codec_error", "not a zstd frame");
        }
        if (declared > 0 && (atMost ? declared > size : declared != size)) {
            throw new WireException("size_mismatch", "zstd frame declares " + declared + " bytes, the shape needs " + size);
        }
        byte[] out;
        try {
            out = Zstd.decompress(frame, (int) Math.min(Integer.MAX_VALUE - 8, size + 1));
        } catch (RuntimeException e) {
            throw new WireException("codec_error", "zstd: " + e.getMessage());
        }
        if (atMost ? out.length > size : out.length != size) {
            throw new WireException("size_mismatch", "zstd frame holds " + out.length + " bytes, expected " + size);
        }
        return out;
    }

    /** Decodes the payload of one float32 tensor of {@code n} elements under {@code codec}. */
    public static float[] decode(String codec, byte[] b, long[] shape) throws WireException {
        int n = (int) Tensor.numel(shape);
        if (codec.equals("raw") || codec.equals("zstd")) {
            byte[] raw = codec.equals("raw") ? b : unzstd(b, 4L * n, false);
            if (raw.length != 4L * n) {
                throw new WireException("size_mismatch", raw.length + " bytes for " + n + " float32 values");
            }
            return Bin.floatsFromLE(raw);
        }
        boolean z = codec.endsWith("+zstd");
        String base = z ? codec.substring(0, codec.length() - 5) : codec;
        int r = rows(shape, n);
        long size;
        switch (base) {
            case "f16": case "bf16": size = 2L * n; break;
            case "int8": size = 4L + n; break;
            case "int8c": size = 4L * r + n; break;
            case "topk": size = 4L + 5L * n; break;
            case "topk8": size = 8L + 2L * n; break;
            default: throw new WireException("unknown_codec", codec);
        }
        boolean topk = base.startsWith("topk");
        byte[] p = z ? unzstd(b, size, topk) : b;
        if (z && (base.equals("f16") || base.equals("bf16"))) {
            p = unshuffle(p, 2);
        }
        float[] out = new float[n];
        switch (base) {
            case "f16":
            case "bf16":
                if (p.length != 2L * n) {
                    throw new WireException("size_mismatch", base + " payload of " + p.length + " bytes");
                }
                for (int i = 0; i < n; i++) {
                    int h = (p[2 * i] & 0xff) | (p[2 * i + 1] & 0xff) << 8;
                    out[i] = base.equals("f16") ? halfToFloat(h) : Float.intBitsToFloat(h << 16);
                }
                return out;
            case "int8":
            case "int8c": {
                int rr = base.equals("int8") ? 1 : r;
                if (p.length != 4L * rr + n) {
                    throw new WireException("size_mismatch", base + " payload of " + p.length + " bytes");
                }
                float[] s = new float[rr];
                for (int j = 0; j < rr; j++) {
                    s[j] = checkScale(Bin.f32le(p, 4 * j));
                }
                int per = n / rr;
                for (int i = 0; i < n; i++) {
                    out[i] = level(p[4 * rr + i]) * s[per == 0 ? 0 : i / per];
                }
                return out;
            }
            default: {
                boolean eight = base.equals("topk8");
                if (p.length < (eight ? 8 : 4)) {
                    throw new WireException("size_mismatch", base + " payload too short");
                }
                long k = Bin.u32le(p, 0);
                if (k > n) {
                    throw new WireException("codec_error", "k " + k + " above n " + n);
                }
                int off = eight ? 8 + (int) k : 4 + 4 * (int) k;
                if (p.length < off) {
                    throw new WireException("size_mismatch", base + " payload too short for k " + k);
                }
                float s = eight ? checkScale(Bin.f32le(p, 4)) : 0f;
                int pos = off;
                long x = -1;
                for (int j = 0; j < k; j++) {
                    long g = 0;
                    int shift = 0;
                    while (true) {
                        if (pos >= p.length || shift > 28) {
                            throw new WireException("codec_error", "bad varint");
                        }
                        int by = p[pos++] & 0xff;
                        g |= (long) (by & 0x7f) << shift;
                        shift += 7;
                        if ((by & 0x80) == 0) {
                            if (by == 0 && shift > 7) {
                                throw new WireException("codec_error", "varint not in shortest form");
                            }
                            break;
                        }
                    }
                    if (g >= (1L << 32)) {
                        throw new WireException("codec_error", "varint above 2^32");
                    }
                    x = x + 1 + g;
                    if (x >= n) {
                        throw new WireException("codec_error", "index out of range");
                    }
                    out[(int) x] = eight ? level(p[8 + j]) * s : Bin.f32le(p, 4 + 4 * j);
                }
                if (pos != p.length) {
                    throw new WireException("codec_error", "bytes left after the varints");
                }
                return out;
            }
        }
    }

    private static float checkScale(float s) throws WireException {
        if (Float.isNaN(s) || Float.isInfinite(s) || (Float.floatToRawIntBits(s) & 0x80000000) != 0) {
            throw new WireException("codec_error", "bad scale " + s);
        }
        return s;
    }

    private static int level(byte q) throws WireException {
        if (q == -128) {
            throw new WireException("codec_error", "int8 value -128");
        }
        return q;
    }
}
