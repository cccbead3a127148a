package io.fedq.participant;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.io.IOException;
import java.io.InputStream;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.KeyStore;
import java.util.List;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SNIHostName;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLParameters;
import javax.net.ssl.SSLServerSocket;
import javax.net.ssl.SSLSocket;
import org.junit.Test;

/**
 * Hostile input: msgpack headers that declare more than the message holds, a broker URL's escapes
 * and options, and a TLS server whose certificate names another host.
 */
public class HostileTest {
    private static final String[] DECLARES_TOO_MUCH = {
        "81a16bc67fffffff", // {"k": bin32 of 2^31-1 bytes}
        "df7fffffff", // map32 of 2^31-1 entries
        "81a16bdd7fffffff", // {"k": array32 of 2^31-1 items}
        "81a16bdbffffffff", // {"k": str32 of 2^32-1 bytes}
        "81a16bc9ffffffff01", // {"k": ext32}
    };

    private static void refusedMalformed(byte[] body) {
        try {
            Wire.topMap(body, Wire.MAX_MESSAGE);
            fail("decoded " + Bin.hex(body));
        } catch (WireException e) {
            assertEquals("malformed", e.reason);
        }
    }

    @Test
    public void lengthsBeyondTheMessageAreMalformed() throws Exception {
        for (String h : DECLARES_TOO_MUCH) {
            byte[] body = Bin.unhex(h);
            refusedMalformed(body);
            assertNull(Wire.peekKind(body));
            try {
                Wire.decodeModel(body, List.of(), List.of());
                fail("a model decoded from " + h);
            } catch (WireException e) {
                assertEquals("malformed", e.reason);
            }
            try {
                Wire.decodeReceipt(body);
                fail("a receipt decoded from " + h);
            } catch (WireException e) {
                assertEquals("malformed", e.reason);
            }
        }
        StringBuilder deep = new StringBuilder();
        for (int i = 0; i < 100; i++) {
            deep.append("91");
        }
        refusedMalformed(Bin.unhex(deep.append("c0").toString()));
        refusedMalformed(Bin.unhex("81a16ba178c0")); // trailing byte
        assertEquals("x", Wire.peekKind(Bin.unhex("81a16ba178")));
    }

    @Test
    public void urlPartsArePercentDecodedWithoutThePlusRule() throws Exception {
        Broker.Target t = Broker.parse("amqp://bank%2Da:a+b%2Bc@localhost/fedq");
        assertEquals("bank-a", t.factory.getUsername());
        assertEquals("a+b+c", t.factory.getPassword());
        assertEquals("fedq", t.factory.getVirtualHost());
        assertEquals("+ x", Broker.decode("+%20x", "password"));
        try {
            Broker.decode("a%2", "password");
            fail("a%2 decoded");
        } catch (FedqException e) {
            assertEquals("--amqp-url has a malformed % escape in its password (% must be followed by two hex digits)",
                    e.getMessage());
        }
        assertEquals(30, Broker.parse("amqp://u:p@localhost/fedq?heartbeat=30").factory.getRequestedHeartbeat());
        String[][] bad = {
            {"amqp://u:a%zz@localhost/fedq", "--amqp-url is not a URL (Malformed escape pair)"},
            {"amqp://u:a%2@localhost/fedq", "--amqp-url is not a URL (Malformed escape pair)"},
            {"amqp://u:%ff@localhost/fedq", "not UTF-8"},
            {"amqp://u:p@localhost/fedq?heartbeat=x", "heartbeat must be a whole number"},
            {"amqp://u:p@localhost/fedq?heartbeat=70000", "heartbeat must be a whole number"},
        };
        for (String[] c : bad) {
            try {
                Broker.parse(c[0]);
                fail(c[0] + " parsed");
            } catch (FedqException e) {
                assertTrue(e.getMessage(), e.getMessage().contains(c[1]));
                assertTrue(e.getMessage(), !e.getMessage().contains("\n"));
            }
        }
    }

    /** A self-signed server certificate naming only {@code san} (keytool's form: dns:NAME or ip:ADDRESS). */
    private static Path certificate(Path dir, String san) throws Exception {
        Path ks = dir.resolve("server.p12");
        run("keytool", "-genkeypair", "-alias", "s", "-keyalg", "EC", "-groupname", "secp256r1", "-dname", "CN=fedq test",
                "-ext", "SAN=" + san, "-validity", "2", "-keystore", ks.toString(), "-storetype", "PKCS12",
                "-storepass", "changeit");
        run("keytool", "-exportcert", "-rfc", "-alias", "s", "-keystore", ks.toString(), "-storepass", "changeit",
                "-file", dir.resolve("ca.pem").toString());
        return ks;
    }

    private static void run(String... cmd) throws Exception {
        Process p = new ProcessBuilder(cmd).redirectErrorStream(true).start();
        byte[] out = p.getInputStream().readAllBytes();
        if (p.waitFor() != 0) {
            throw new IOException(String.join(" ", cmd) + ": " + new String(out, "UTF-8"));
        }
    }

    /** Handshakes with a TLS server on 127.0.0.1 that presents ks's certificate, as the URL host {@code host}. */
    private static String handshake(Path dir, Path ks, String host) throws Exception {
        KeyStore store = KeyStore.getInstance("PKCS12");
        try (InputStream in = Files.newInputStream(ks)) {
            store.load(in, "changeit".toCharArray());
        }
        KeyManagerFactory kmf = KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
        kmf.init(store, "changeit".toCharArray());
        SSLContext server = SSLContext.getInstance("TLS");
        server.init(kmf.getKeyManagers(), null, null);
        try (SSLServerSocket ss = (SSLServerSocket) server.getServerSocketFactory()
                .createServerSocket(0, 1, InetAddress.getByName("127.0.0.1"))) {
            Thread t = new Thread(() -> {
                try (SSLSocket s = (SSLSocket) ss.accept()) {
                    s.startHandshake();
                    s.getOutputStream().write(1);
                } catch (IOException e) {
                    // the client refused the certificate
                }
            });
            t.start();
            SSLContext client = Broker.sslContext(dir.resolve("ca.pem").toString(), host);
            // as the AMQP client library does: an unconnected socket, connected afterwards
            try (SSLSocket c = (SSLSocket) client.getSocketFactory().createSocket()) {
                if (!Broker.isIpLiteral(host)) {
                    SSLParameters p = c.getSSLParameters();
                    p.setServerNames(List.of(new SNIHostName(host)));
                    c.setSSLParameters(p);
                }
                c.connect(new InetSocketAddress("127.0.0.1", ss.getLocalPort()), 10_000);
                c.setSoTimeout(10_000);
                c.startHandshake();
                c.getInputStream().read();
                return "ok";
            } catch (IOException e) {
                String why = e.getMessage();
                for (Throwable x = e.getCause(); x != null; x = x.getCause()) {
                    why = x.getMessage() == null ? why : x.getMessage();
                }
                return why;
            } finally {
                t.join(10_000);
            }
        }
    }

    @Test
    public void tlsChecksTheUrlsHostNotTheConnectedAddress() throws Exception {
        Path dir = Files.createTempDirectory("fedq-java-tls");
        Path dns = certificate(Files.createDirectories(dir.resolve("dns")), "dns:localhost");
        assertEquals("ok", handshake(dir.resolve("dns"), dns, "localhost"));
        assertEquals("ok", handshake(dir.resolve("dns"), dns, "LOCALHOST"));
        assertEquals("the broker's TLS certificate does not name 127.0.0.1 (it names localhost)",
                handshake(dir.resolve("dns"), dns, "127.0.0.1"));
        Path other = certificate(Files.createDirectories(dir.resolve("other")), "dns:broker.example");
        assertEquals("the broker's TLS certificate does not name localhost (it names broker.example)",
                handshake(dir.resolve("other"), other, "localhost"));
        assertEquals("the broker's TLS certificate does not name 127.0.0.1 (it names broker.example)",
                handshake(dir.resolve("other"), other, "127.0.0.1"));
        Path ip = certificate(Files.createDirectories(dir.resolve("ip")), "ip:127.0.0.1");
        assertEquals("ok", handshake(dir.resolve("ip"), ip, "127.0.0.1"));
        assertTrue(handshake(dir.resolve("ip"), ip, "localhost").contains("does not name localhost"));
    }
}
