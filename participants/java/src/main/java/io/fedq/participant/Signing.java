package io.fedq.participant;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.GeneralSecurityException;
import java.security.KeyFactory;
import java.security.PrivateKey;
import java.security.PublicKey;
import java.security.Signature;
import java.security.spec.PKCS8EncodedKeySpec;
import java.security.spec.X509EncodedKeySpec;
import java.util.Arrays;
import java.util.Base64;

/** Ed25519 keys and signatures (docs/wire-format.md section 15), with the JDK's own Ed25519. */
public final class Signing {
    private Signing() {}

    private static final byte[] PKCS8_PREFIX = Bin.unhex("302e020100300506032b657004220420");
    private static final byte[] X509_PREFIX = Bin.unhex("302a300506032b6570032100");

    public static PrivateKey privateFromSeed(byte[] seed) throws GeneralSecurityException {
        byte[] der = new byte[PKCS8_PREFIX.length + 32];
        System.arraycopy(PKCS8_PREFIX, 0, der, 0, PKCS8_PREFIX.length);
        System.arraycopy(seed, 0, der, PKCS8_PREFIX.length, 32);
        return KeyFactory.getInstance("Ed25519").generatePrivate(new PKCS8EncodedKeySpec(der));
    }

    /** Reads a private key file as {@code fedq keys generate} writes it (PKCS#8 PEM). */
    public static PrivateKey readPrivateKey(Path file) throws FedqException {
        String text;
        try {
            text = Files.readString(file, StandardCharsets.US_ASCII);
        } catch (IOException e) {
            throw new FedqException("cannot read the key file " + file + ": " + Bin.reason(e));
        }
        int a = text.indexOf("-----BEGIN PRIVATE KEY-----");
        int b = text.indexOf("-----END PRIVATE KEY-----");
        if (a < 0 || b < a) {
            throw new FedqException("key file " + file + " is not a PKCS#8 PEM private key (BEGIN PRIVATE KEY)");
        }
        try {
            byte[] der = Base64.getMimeDecoder().decode(text.substring(a + 27, b));
            return KeyFactory.getInstance("Ed25519").generatePrivate(new PKCS8EncodedKeySpec(der));
        } catch (IllegalArgumentException | GeneralSecurityException e) {
            throw new FedqException("key file " + file + " does not hold an Ed25519 private key");
        }
    }

    /** {@code ed25519:<64 hex digits>} to its 32 raw bytes. */
    public static byte[] rawPublic(String text) throws FedqException {
        if (text == null || !text.startsWith("ed25519:") || text.length() != 8 + 64) {
            throw new FedqException("not an Ed25519 public key (ed25519: and 64 hex digits): " + text);
        }
        try {
            return Bin.unhex(text.substring(8));
        } catch (IllegalArgumentException e) {
            throw new FedqException("not an Ed25519 public key: " + text);
        }
    }

    public static PublicKey publicKey(byte[] raw) throws GeneralSecurityException {
        byte[] der = new byte[X509_PREFIX.length + 32];
        System.arraycopy(X509_PREFIX, 0, der, 0, X509_PREFIX.length);
        System.arraycopy(raw, 0, der, X509_PREFIX.length, 32);
        return KeyFactory.getInstance("Ed25519").generatePublic(new X509EncodedKeySpec(der));
    }

    /** Whether {@code key} is the private half of the raw public key. */
    public static boolean matches(PrivateKey key, byte[] rawPublic) {
        try {
            byte[] probe = Bin.utf8("fedq key check");
            return verify(rawPublic, probe, sign(key, probe));
        } catch (GeneralSecurityException e) {
            return false;
        }
    }

    public static byte[] sign(PrivateKey key, byte[] message) throws GeneralSecurityException {
        Signature s = Signature.getInstance("Ed25519");
        s.initSign(key);
        s.update(message);
        return s.sign();
    }

    public static boolean verify(byte[] rawPublic, byte[] message, byte[] signature) {
        if (signature == null || signature.length != 64) {
            return false;
        }
        try {
            Signature s = Signature.getInstance("Ed25519");
            s.initVerify(publicKey(rawPublic));
            s.update(message);
            return s.verify(signature);
        } catch (GeneralSecurityException e) {
            return false;
        }
    }

    /** The first 16 bytes of SHA-256 of the raw public key, in hex. */
    public static String fingerprint(byte[] rawPublic) {
        return Bin.hex(Arrays.copyOf(Bin.sha256(rawPublic), 16));
    }
}
