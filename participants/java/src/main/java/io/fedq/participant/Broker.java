package io.fedq.participant;

import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.net.InetAddress;
import java.net.Socket;
import java.net.URI;
import java.net.UnknownHostException;
import java.net.URISyntaxException;
import java.nio.ByteBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.GeneralSecurityException;
import java.security.KeyStore;
import java.security.cert.Certificate;
import java.security.cert.CertificateException;
import java.security.cert.CertificateFactory;
import java.security.cert.X509Certificate;
import java.util.ArrayList;
import java.util.Collection;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.concurrent.TimeoutException;
import javax.net.ssl.SNIHostName;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLEngine;
import javax.net.ssl.SSLParameters;
import javax.net.ssl.SSLSocket;
import javax.net.ssl.TrustManager;
import javax.net.ssl.TrustManagerFactory;
import javax.net.ssl.X509ExtendedTrustManager;
import javax.net.ssl.X509TrustManager;

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
            // the reason only: the message would show the URL, password included
            throw new FedqException("--amqp-url is not a URL (" + e.getReason() + ")");
        }
        String scheme = uri.getScheme();
        if (!"amqp".equals(scheme) && !"amqps".equals(scheme)) {
            throw new FedqException("--amqp-url must start with amqps:// (or amqp://), not " + scheme + "://");
        }
        String info = uri.getRawUserInfo();
        if (info == null || !info.contains(":")) {
            throw new FedqException("--amqp-url needs the bank's broker user and password (amqps://USER:PASSWORD@HOST/fedq)");
        }
        String user = decode(info.substring(0, info.indexOf(':')), "user");
        String password = decode(info.substring(info.indexOf(':') + 1), "password");
        Map<String, String> query = new LinkedHashMap<>();
        if (uri.getRawQuery() != null) {
            for (String kv : uri.getRawQuery().split("&")) {
                int eq = kv.indexOf('=');
                String k = decode(eq < 0 ? kv : kv.substring(0, eq), "option name");
                query.put(k, eq < 0 ? "" : decode(kv.substring(eq + 1), "option " + k));
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
        String vhost = path == null || path.isEmpty() || path.equals("/") ? "/" : decode(path.substring(1), "virtual host");
        ConnectionFactory f = new ConnectionFactory();
        f.setHost(uri.getHost() == null ? "localhost" : uri.getHost());
        final String host = bare(f.getHost());
        f.setPort(uri.getPort() > 0 ? uri.getPort() : (tls ? 5671 : 5672));
        f.setUsername(user);
        f.setPassword(password);
        f.setVirtualHost(vhost);
        f.setRequestedHeartbeat(query.containsKey("heartbeat") ? heartbeat(query.get("heartbeat")) : 60);
        f.setConnectionTimeout(30_000);
        f.setAutomaticRecoveryEnabled(false);
        if (tls) {
            // The client library creates the TLS socket unconnected, so the JDK's own host name check would
            // compare the certificate with the connected IP address: HostCheck compares it with the URL's host.
            f.useSslProtocol(sslContext(query.get("cafile"), host));
            f.setSocketConfigurator(socket -> {
                if (socket instanceof SSLSocket && !isIpLiteral(host)) {
                    SSLParameters p = ((SSLSocket) socket).getSSLParameters();
                    p.setServerNames(List.of(new SNIHostName(host)));
                    ((SSLSocket) socket).setSSLParameters(p);
                }
                socket.setTcpNoDelay(true);
            });
        }
        String shown = scheme + "://" + user + "@" + f.getHost() + ":" + f.getPort() + "/" + vhost;
        return new Target(user, f, shown);
    }

    /** Percent-decodes one part of the URL as UTF-8 ({@code +} stays a plus, as in a URL's user info and path). */
    static String decode(String s, String what) throws FedqException {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            if (c == '%') {
                int hi = i + 2 < s.length() ? Character.digit(s.charAt(i + 1), 16) : -1;
                int lo = i + 2 < s.length() ? Character.digit(s.charAt(i + 2), 16) : -1;
                if (hi < 0 || lo < 0) {
                    throw new FedqException("--amqp-url has a malformed % escape in its " + what
                            + " (% must be followed by two hex digits)");
                }
                out.write(hi * 16 + lo);
                i += 2;
            } else {
                byte[] b = String.valueOf(c).getBytes(StandardCharsets.UTF_8);
                if (Character.isHighSurrogate(c) && i + 1 < s.length()) {
                    b = s.substring(i, i + 2).getBytes(StandardCharsets.UTF_8);
                    i++;
                }
                out.write(b, 0, b.length);
            }
        }
        try {
            return StandardCharsets.UTF_8.newDecoder().onMalformedInput(CodingErrorAction.REPORT)
                    .onUnmappableCharacter(CodingErrorAction.REPORT).decode(ByteBuffer.wrap(out.toByteArray())).toString();
        } catch (CharacterCodingException e) {
            throw new FedqException("--amqp-url has % escapes in its " + what + " that are not UTF-8");
        }
    }

    static int heartbeat(String s) throws FedqException {
        if (!s.matches("[0-9]{1,5}") || Integer.parseInt(s) > 65535) {
            throw new FedqException("--amqp-url option heartbeat must be a whole number of seconds from 0 to 65535, not '"
                    + s + "'");
        }
        return Integer.parseInt(s);
    }

    static String bare(String host) {
        return host.startsWith("[") && host.endsWith("]") ? host.substring(1, host.length() - 1) : host;
    }

    static boolean isIpLiteral(String host) {
        return host.matches("[0-9.]+") || host.contains(":");
    }

    /**
     * A trust manager that checks the chain with the JDK's (against cafile or the JDK's trust store) and
     * then the server certificate's subject alternative names against the URL's host: DNS names for a host
     * name (a leading {@code *.} matches one label), IP addresses for an IP literal.
     */
    static final class HostCheck extends X509ExtendedTrustManager {
        private final X509TrustManager chain;
        private final String host;

        HostCheck(X509TrustManager chain, String host) {
            this.chain = chain;
            this.host = host;
        }

        @Override
        public void checkServerTrusted(X509Certificate[] certs, String authType) throws CertificateException {
            chain.checkServerTrusted(certs, authType);
            checkHost(certs[0], host);
        }

        @Override
        public void checkServerTrusted(X509Certificate[] certs, String authType, Socket socket)
                throws CertificateException {
            checkServerTrusted(certs, authType);
        }

        @Override
        public void checkServerTrusted(X509Certificate[] certs, String authType, SSLEngine engine)
                throws CertificateException {
            checkServerTrusted(certs, authType);
        }

        @Override
        public void checkClientTrusted(X509Certificate[] certs, String authType) throws CertificateException {
            throw new CertificateException("this client does not accept TLS clients");
        }

        @Override
        public void checkClientTrusted(X509Certificate[] certs, String authType, Socket socket)
                throws CertificateException {
            checkClientTrusted(certs, authType);
        }

        @Override
        public void checkClientTrusted(X509Certificate[] certs, String authType, SSLEngine engine)
                throws CertificateException {
            checkClientTrusted(certs, authType);
        }

        @Override
        public X509Certificate[] getAcceptedIssuers() {
            return chain.getAcceptedIssuers();
        }
    }

    /** Refuses (CertificateException, one line) a certificate whose subject alternative names do not name host. */
    static void checkHost(X509Certificate cert, String host) throws CertificateException {
        boolean ip = isIpLiteral(host);
        List<String> names = new ArrayList<>();
        Collection<List<?>> sans = cert.getSubjectAlternativeNames();
        if (sans != null) {
            for (List<?> san : sans) {
                int type = (Integer) san.get(0);
                if (type != 2 && type != 7) {
                    continue;
                }
                String name = (String) san.get(1);
                names.add(name);
                if (ip && type == 7 && sameAddress(name, host)) {
                    return;
                }
                if (!ip && type == 2 && dnsMatch(name, host)) {
                    return;
                }
            }
        }
        throw new CertificateException("the broker's TLS certificate does not name " + host + " (it names "
                + (names.isEmpty() ? "no DNS name or IP address" : String.join(", ", names)) + ")");
    }

    private static boolean sameAddress(String a, String b) {
        try {
            return isIpLiteral(a) && InetAddress.getByName(a).equals(InetAddress.getByName(b));
        } catch (UnknownHostException e) {
            return false;
        }
    }

    private static boolean dnsMatch(String pattern, String host) {
        String p = pattern.toLowerCase(Locale.ROOT);
        String h = host.toLowerCase(Locale.ROOT);
        if (p.endsWith(".")) {
            p = p.substring(0, p.length() - 1);
        }
        if (h.endsWith(".")) {
            h = h.substring(0, h.length() - 1);
        }
        if (p.startsWith("*.") && p.indexOf('*', 1) < 0) {
            int dot = h.indexOf('.');
            return dot > 0 && h.substring(dot).equals(p.substring(1));
        }
        return !p.contains("*") && p.equals(h);
    }

    static SSLContext sslContext(String cafile, String host) throws FedqException {
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
            List<TrustManager> tms = new ArrayList<>();
            for (TrustManager tm : tmf.getTrustManagers()) {
                if (tm instanceof X509TrustManager) {
                    tms.add(new HostCheck((X509TrustManager) tm, host));
                }
            }
            ctx.init(null, tms.toArray(new TrustManager[0]), null);
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
