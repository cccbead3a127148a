package io.fedq.participant;

import java.io.ByteArrayOutputStream;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;

/** Byte helpers: hex, little-endian writing, SHA-256 (docs/wire-format.md conventions). */
public final class Bin {
    private Bin() {}

    public static String hex(byte[] b) {
        StringBuilder sb = new StringBuilder(b.length * 2);
        for (byte x : b) {
            sb.append(Character.forDigit((x >> 4) & 0xf, 16)).append(Character.forDigit(x & 0xf, 16));
        }
        return sb.toString();
    }

    public static byte[] unhex(String s) {
        String t = s.replaceAll("\\s+", "");
        if (t.length() % 2 != 0) {
            throw new IllegalArgumentException("odd number of hex digits");
        }
        byte[] out = new byte[t.length() / 2];
        for (int i = 0; i < out.length; i++) {
            int hi = Character.digit(t.charAt(2 * i), 16);
            int lo = Character.digit(t.charAt(2 * i + 1), 16);
            if (hi < 0 || lo < 0) {
                throw new IllegalArgumentException("not a hex digit in " + s);
            }
            out[i] = (byte) ((hi << 4) | lo);
        }
        return out;
    }

    /** A short reason for an I/O error ("no such file", "permission denied", ...). */
    public static String reason(java.io.IOException e) {
        if (e instanceof java.nio.file.NoSuchFileException) {
            return "no such file";
        }
        if (e instanceof java.nio.file.AccessDeniedException) {
            return "permission denied";
        }
        if (e instanceof java.nio.file.FileSystemException && ((java.nio.file.FileSystemException) e).getReason() != null) {
            return ((java.nio.file.FileSystemException) e).getReason();
        }
        return e.getMessage() == null ? e.getClass().getSimpleName() : e.getMessage();
    }

    public static byte[] sha256(byte[]... parts) {
        try {
            MessageDigest md = MessageDigest.getInstance("SHA-256");
            for (byte[] p : parts) {
                md.update(p);
            }
            return md.digest();
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException("SHA-256 missing", e);
        }
    }

    public static byte[] utf8(String s) {
        return s.getBytes(StandardCharsets.UTF_8);
    }

    /** A growing little-endian byte buffer. */
    public static final class Writer {
        private final ByteArrayOutputStream out = new ByteArrayOutputStream();

        public Writer bytes(byte[] b) {
            out.write(b, 0, b.length);
            return this;
        }

        public Writer u8(int v) {
            out.write(v & 0xff);
            return this;
        }

        public Writer u16(int v) {
            u8(v);
            return u8(v >>> 8);
        }

        public Writer u32(long v) {
            for (int i = 0; i < 4; i++) {
                u8((int) (v >>> (8 * i)));
            }
            return this;
        }

        public Writer u64(long v) {
            for (int i = 0; i < 8; i++) {
                u8((int) (v >>> (8 * i)));
            }
            return this;
        }

        public Writer f64(double d) {
            return u64(Double.doubleToRawLongBits(d));
        }

        public Writer f32(float f) {
            return u32(Float.floatToRawIntBits(f) & 0xffffffffL);
        }

        /** {@code text(s)}: a u16 LE byte length, then the UTF-8 bytes. */
        public Writer text(String s) {
            byte[] b = utf8(s);
            if (b.length > 0xffff) {
                throw new IllegalArgumentException("text longer than 65535 bytes");
            }
            u16(b.length);
            return bytes(b);
        }

        public byte[] toBytes() {
            return out.toByteArray();
        }

        public int size() {
            return out.size();
        }
    }

    public static float f32le(byte[] b, int off) {
        int bits = (b[off] & 0xff) | (b[off + 1] & 0xff) << 8 | (b[off + 2] & 0xff) << 16 | (b[off + 3] & 0xff) << 24;
        return Float.intBitsToFloat(bits);
    }

    public static long u32le(byte[] b, int off) {
        return ((b[off] & 0xffL) | (b[off + 1] & 0xffL) << 8 | (b[off + 2] & 0xffL) << 16 | (b[off + 3] & 0xffL) << 24);
    }

    public static byte[] floatsLE(float[] v) {
        byte[] out = new byte[v.length * 4];
        for (int i = 0; i < v.length; i++) {
            int bits = Float.floatToRawIntBits(v[i]);
            out[4 * i] = (byte) bits;
            out[4 * i + 1] = (byte) (bits >>> 8);
            out[4 * i + 2] = (byte) (bits >>> 16);
            out[4 * i + 3] = (byte) (bits >>> 24);
        }
        return out;
    }

    public static float[] floatsFromLE(byte[] b) {
        float[] out = new float[b.length / 4];
        for (int i = 0; i < out.length; i++) {
            out[i] = f32le(b, 4 * i);
        }
        return out;
    }
}
