package io.fedq.participant;

import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import java.io.IOException;
import java.io.InputStream;
import java.net.URI;
import java.net.URISyntaxException;
import java.net.URLDecoder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.GeneralSecurityException;
import java.security.KeyStore;
import java.security.cert.Certificate;
import java.security.cert.CertificateFactory;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.concurrent.TimeoutException;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLParameters;
import javax.net.ssl.SSLSocket;
import javax.net.ssl.TrustManagerFactory;

/**
 * The broker connection of docs/protocol.md section 2: {@code amqps://USER:PASSWORD@HOST:PORT/fedq?cafile=CA}
 * (the server's certificate verified against {@code cafile}, or the JDK's trust store without it,
 * host name included), or plain {@code amqp://} for a broker without TLS.
 */
public final class Broker {
    private Broker() {}

    /** What a URL names: the user (the participant id) and the connection factory. */
    public static final class Target {
        public final String user;
        public final ConnectionFactory factory;
        public final String shown;

        Target(String user, ConnectionFactory factory, String shown) {
            this.user = user;
            this.factory = factory;
            this.shown = shown;
        }
    }

    public static Target parse(String url) throws FedqException {
        URI uri;
        try {
            uri = new URI(url);
        } catch (URISyntaxException e) {
            throw new FedqException("--amqp-url is not a URL");
        }
        String scheme = uri.getScheme();
        if (!"amqp".equals(scheme) && !"amqps".equals(scheme)) {
            throw new FedqException("--amqp-url must start with amqps:// (or amqp://), not " + scheme + "://");
        }
        String info = uri.getRawUserInfo();
        if (info == null || !info.contains(":")) {
            throw new FedqException("--amqp-url needs the bank's broker user and password (amqps://USER:PASSWORD@HOST/fedq)");
        }
        String user = decode(info.substring(0, info.indexOf(':')));
        String password = decode(info.substring(info.indexOf(':') + 1));
        Map<String, String> query = new LinkedHashMap<>();
        if (uri.getRawQuery() != null) {
            for (String kv : uri.getRawQuery().split("&")) {
                int eq = kv.indexOf('=');
                query.put(decode(eq < 0 ? kv : kv.substring(0, eq)), eq < 0 ? "" : decode(kv.substring(eq + 1)));
            }
        }
        for (String k : query.keySet()) {
            if (!k.equals("cafile") && !k.equals("heartbeat")) {
                throw new FedqException("--amqp-url option " + k + " is not supported by this client (cafile, heartbeat)");
            }
        }
        boolean tls = scheme.equals("amqps");
        if (!tls && query.containsKey("cafile")) {
            throw new FedqException("--amqp-url has cafile but is not a TLS URL (amqps://)");
        }
        String path = uri.getRawPath();
        String vhost = path == null || path.isEmpty() || path.equals("/") ? "/" : decode(path.substring(1));
        ConnectionFactory f = new ConnectionFactory();
        f.setHost(uri.getHost() == null ? "localhost" : uri.getHost());
        f.setPort(uri.getPort() > 0 ? uri.getPort() : (tls ? 5671 : 5672));
        f.setUsername(user);
        f.setPassword(password);
        f.setVirtualHost(vhost);
        f.setRequestedHeartbeat(query.containsKey("heartbeat") ? Integer.parseInt(query.get("heartbeat")) : 60);
        f.setConnectionTimeout(30_000);
        f.setAutomaticRecoveryEnabled(false);
        if (tls) {
            f.useSslProtocol(sslContext(query.get("cafile")));
            f.setSocketConfigurator(socket -> {
                if (socket instanceof SSLSocket) {
                    SSLParameters p = ((SSLSocket) socket).getSSLParameters();
                    p.setEndpointIdentificationAlgorithm("HTTPS");
                    ((SSLSocket) socket).setSSLParameters(p);
                }
                socket.setTcpNoDelay(true);
            });
        }
        String shown = scheme + "://" + user + "@" + f.getHost() + ":" + f.getPort() + "/" + vhost;
        return new Target(user, f, shown);
    }

    private static String decode(String s) {
        return URLDecoder.decode(s, StandardCharsets.UTF_8);
    }

    static SSLContext sslContext(String cafile) throws FedqException {
        try {
            TrustManagerFactory tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
            if (cafile == null) {
                tmf.init((KeyStore) null);
            } else {
                KeyStore ks = KeyStore.getInstance(KeyStore.getDefaultType());
                ks.load(null, null);
                try (InputStream in = Files.newInputStream(Path.of(cafile))) {
                    int i = 0;
                    for (Certificate c : CertificateFactory.getInstance("X.509").generateCertificates(in)) {
                        ks.setCertificateEntry("ca-" + i++, c);
                    }
                    if (i == 0) {
                        throw new FedqException("the TLS file cafile=" + cafile + " holds no certificate");
                    }
                }
                tmf.init(ks);
            }
            SSLContext ctx = SSLContext.getInstance("TLS");
            ctx.init(null, tmf.getTrustManagers(), null);
            return ctx;
        } catch (IOException e) {
            throw new FedqException("cannot read the TLS file cafile=" + cafile + ": " + Bin.reason(e));
        } catch (GeneralSecurityException e) {
            throw new FedqException("cannot use the TLS file cafile=" + cafile + ": " + e.getMessage());
        }
    }

    public static Connection connect(Target t, String name) throws FedqException {
        try {
            return t.factory.newConnection(name);
        } catch (IOException | TimeoutException e) {
            String why = e.getMessage();
            for (Throwable c = e.getCause(); c != null; c = c.getCause()) {
                if (c.getMessage() != null) {
                    why = c.getMessage();
                }
            }
            throw new FedqException("cannot connect to " + t.shown + ": " + (why == null ? e.getClass().getSimpleName() : why));
        }
    }
}
