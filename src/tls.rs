//! TLS material: loading PEM files into rustls configurations for both
//! directions (mutual TLS), and checking that a peer's certificate names the
//! cluster it claims to be.

use std::collections::HashMap;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::{PathAt, Problem, TlsFiles};

/// ALPN protocol id, so a wandist port is never mistaken for something else.
pub const ALPN: &[u8] = b"wandist/1";
/// PEM files larger than this are refused rather than read.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// Ready-to-use configurations for dialing and accepting.
///
/// Trust is per peer: a peer is cluster X only if its chain ends at a CA
/// trusted *for X* (the route's own `ca`, else `tls.ca`), is not revoked
/// by a CRL in `tls.crl`, and names X. The acceptor's TLS handshake takes
/// chains to any trusted CA (it does not know the cluster yet); once the
/// hello names one, [`Tls::verify_peer`] checks the chain again against
/// that cluster's CAs, so a partner's CA vouches for that partner only.
#[derive(Clone)]
pub struct Tls {
    /// For dialing a peer trusted through `tls.ca`.
    pub client: Arc<ClientConfig>,
    pub server: Arc<ServerConfig>,
    /// When this gateway's own certificate expires (unix seconds).
    pub not_after: i64,
    /// `tls.ca`'s verifier for clients, for the check after the hello.
    verifier: Arc<dyn ClientCertVerifier>,
    /// Peers whose route names its own CA.
    routes: HashMap<String, Trust>,
    /// What is valid but likely wrong (`check` prints it, `run` logs it).
    pub warnings: Vec<String>,
}

/// What one route with its own CA trusts: for dialing, and for the check
/// after an incoming peer's hello.
#[derive(Clone)]
struct Trust {
    client: Arc<ClientConfig>,
    verifier: Arc<dyn ClientCertVerifier>,
}

/// TLS material a reload may replace: each new handshake takes the
/// current one; links already up keep what they were made with.
#[derive(Clone, Debug)]
pub struct Shared(Arc<std::sync::RwLock<Tls>>);

impl Shared {
    pub fn new(tls: Tls) -> Shared {
        Shared(Arc::new(std::sync::RwLock::new(tls)))
    }

    /// The material for the next handshake.
    pub fn current(&self) -> Tls {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace(&self, tls: Tls) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = tls;
    }
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls { .. }")
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_pem(at: &PathAt, config: &Path) -> Result<Vec<u8>, Problem> {
    let problem = |message: String| Problem { file: config.to_path_buf(), line: at.line, message };
    let meta = std::fs::metadata(&at.path).map_err(|e| problem(format!("cannot read {}: {e}", at.path.display())))?;
    if meta.len() > MAX_PEM_BYTES {
        return Err(problem(format!(
            "{} is {} bytes; PEM files over {MAX_PEM_BYTES} bytes are refused",
            at.path.display(),
            meta.len()
        )));
    }
    std::fs::read(&at.path).map_err(|e| problem(format!("cannot read {}: {e}", at.path.display())))
}

fn certs(at: &PathAt, config: &Path) -> Result<Vec<CertificateDer<'static>>, Problem> {
    pem_all(at, config, "CERTIFICATE", |r| rustls_pemfile::certs(r).collect())
}

/// Every item of one kind in a PEM file: at least one.
fn pem_all<T>(
    at: &PathAt,
    config: &Path,
    what: &str,
    parse: impl FnOnce(&mut BufReader<&[u8]>) -> std::io::Result<Vec<T>>,
) -> Result<Vec<T>, Problem> {
    let pem = read_pem(at, config)?;
    let problem = |message: String| Problem { file: config.to_path_buf(), line: at.line, message };
    let items =
        parse(&mut BufReader::new(&pem[..])).map_err(|e| problem(format!("{}: bad PEM: {e}", at.path.display())))?;
    if items.is_empty() {
        return Err(problem(format!("{}: no {what} found", at.path.display())));
    }
    Ok(items)
}

fn key(at: &PathAt, config: &Path) -> Result<PrivateKeyDer<'static>, Problem> {
    let problem = |message: String| Problem { file: config.to_path_buf(), line: at.line, message };
    if std::fs::metadata(&at.path).is_ok() {
        crate::config::owner_only(&at.path).map_err(|e| problem(format!("{}: {e}", at.path.display())))?;
    }
    let pem = read_pem(at, config)?;
    rustls_pemfile::private_key(&mut BufReader::new(&pem[..]))
        .map_err(|e| problem(format!("{}: bad PEM: {e}", at.path.display())))?
        .ok_or_else(|| problem(format!("{}: no PRIVATE KEY found", at.path.display())))
}

impl Tls {
    /// Loads and checks everything: files, PEM, key/cert match, and that our
    /// own certificate names our cluster and has not expired (peers would
    /// refuse us otherwise). Reports every problem found. Without
    /// `own_cluster`, skips those identity checks (only loads the material).
    pub fn load(files: &TlsFiles, own_cluster: Option<&str>, config: &Path) -> Result<Tls, Vec<Problem>> {
        let mut problems = Vec::new();
        let chain = certs(&files.cert, config).map_err(|p| problems.push(p)).ok();
        let key = key(&files.key, config).map_err(|p| problems.push(p)).ok();
        let ca = certs(&files.ca, config).map_err(|p| problems.push(p)).ok();
        let (Some(chain), Some(key), Some(ca)) = (chain, key, ca) else {
            return Err(problems);
        };

        let problem = |at: &PathAt, message: String| Problem { file: config.to_path_buf(), line: at.line, message };
        let not_after = match chain.first().map(not_after) {
            Some(Ok(t)) => t,
            Some(Err(e)) => {
                problems.push(problem(&files.cert, format!("{}: {e}", files.cert.path.display())));
                0
            }
            None => 0,
        };
        if own_cluster.is_some() && not_after > 0 && not_after <= crate::date::now_secs() {
            problems.push(problem(
                &files.cert,
                format!(
                    "{}: certificate expired on {}; peers would refuse this gateway",
                    files.cert.path.display(),
                    crate::date::ymd(not_after)
                ),
            ));
        }
        if let Some(own) = own_cluster {
            if let Err(e) = peer_is(&chain, own) {
                problems.push(problem(
                    &files.cert,
                    format!("{}: {e}; peers would refuse this gateway", files.cert.path.display()),
                ));
            }
        }
        let crls = match &files.crl {
            Some(at) => crls(at, config).map_err(|p| problems.push(p)).unwrap_or_default(),
            None => Vec::new(),
        };
        let default_roots = roots(&files.ca, ca, config, &mut problems);
        let mut route_roots = Vec::new();
        for (cluster, at) in &files.route_cas {
            if let Ok(cas) = certs(at, config).map_err(|p| problems.push(p)) {
                route_roots.push((cluster.clone(), at, roots(at, cas, config, &mut problems)));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let key_fits = |e: rustls::Error| {
            vec![problem(
                &files.key,
                format!("{} does not fit {}: {e}", files.key.path.display(), files.cert.path.display()),
            )]
        };
        // The acceptor's handshake: a chain to any CA trusted for any peer.
        let mut any = RootCertStore::empty();
        any.roots.extend(default_roots.roots.iter().cloned());
        for (_, _, r) in &route_roots {
            any.roots.extend(r.roots.iter().cloned());
        }
        let handshake_verifier = client_verifier(Arc::new(any), &crls)
            .map_err(|e| vec![problem(&files.ca, format!("{}: {e}", files.ca.path.display()))])?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| vec![problem(&files.cert, e.to_string())])?
            .with_client_cert_verifier(handshake_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(key_fits)?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        let trust = |at: &PathAt, roots: RootCertStore| -> Result<Trust, Vec<Problem>> {
            let unusable = |e: String| vec![problem(at, format!("{}: {e}", at.path.display()))];
            let roots = Arc::new(roots);
            let verifier = client_verifier(roots.clone(), &crls).map_err(|e| unusable(e.to_string()))?;
            let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
                .with_crls(crls.iter().cloned())
                .allow_unknown_revocation_status()
                .build()
                .map_err(|e| unusable(e.to_string()))?;
            let mut client = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| vec![problem(&files.cert, e.to_string())])?
                .with_webpki_verifier(server_verifier)
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(key_fits)?;
            client.alpn_protocols = vec![ALPN.to_vec()];
            Ok(Trust { client: Arc::new(client), verifier })
        };
        let default = trust(&files.ca, default_roots)?;
        let mut routes = HashMap::new();
        for (cluster, at, r) in route_roots {
            routes.insert(cluster, trust(at, r)?);
        }
        // Our own chain under tls.ca, as a peer trusting the same CA would
        // check it: a tls.ca that is not the CA that signed us (say a leaf
        // certificate, or another cluster's CA) is most likely a mistake.
        let mut warnings = Vec::new();
        if let (Some(_), Some((end, intermediates))) = (own_cluster, chain.split_first()) {
            if let Err(e) = default.verifier.verify_client_cert(end, intermediates, UnixTime::now()) {
                warnings.push(format!(
                    "{} does not chain to tls.ca ({}): {e}. Peers that trust only this CA would refuse this gateway; tls.ca should be the CA that signs the clusters' certificates, not a leaf certificate",
                    files.cert.path.display(),
                    files.ca.path.display()
                ));
            }
        }
        Ok(Tls {
            client: default.client,
            server: Arc::new(server),
            not_after,
            verifier: default.verifier,
            routes,
            warnings,
        })
    }

    /// The configuration for dialing `cluster`: its route's CA if it has
    /// one, else `tls.ca`.
    pub fn client_for(&self, cluster: &str) -> &Arc<ClientConfig> {
        self.routes.get(cluster).map_or(&self.client, |t| &t.client)
    }

    /// Whether an incoming peer's chain proves it is `cluster`: it ends at
    /// a CA trusted for `cluster`, nothing in it is revoked, and it names
    /// `cluster`.
    pub fn verify_peer(&self, chain: &[CertificateDer<'_>], cluster: &str) -> Result<(), String> {
        let (end, intermediates) = chain.split_first().ok_or("no certificate presented")?;
        let verifier = self.routes.get(cluster).map_or(&self.verifier, |t| &t.verifier);
        verifier.verify_client_cert(end, intermediates, UnixTime::now()).map_err(|e| {
            let whose = if self.routes.contains_key(cluster) { "the route's own ca" } else { "tls.ca" };
            format!("certificate not valid for cluster {cluster:?} under {whose}: {e}")
        })?;
        peer_is(chain, cluster)
    }
}

/// TLS for the distribution connections to local nodes (`[erlang.tls]`,
/// OTP's `inet_tls_dist`): the gateway dials as a client with its own
/// certificate (nodes started with `verify_peer` and
/// `fail_if_no_peer_cert` check it), and checks the node's chain against
/// `ca` and, as `inet_tls_dist` does by default, that it names the host
/// of the node's name. With `check_host = false` (for clusters whose
/// nodes run `{server_name_indication, disable}`, e.g. one certificate
/// for every node) only the chain is checked.
pub fn dist_client(files: &TlsFiles, check_host: bool, config: &Path) -> Result<Arc<ClientConfig>, Vec<Problem>> {
    let mut problems = Vec::new();
    let chain = certs(&files.cert, config).map_err(|p| problems.push(p)).ok();
    let key = key(&files.key, config).map_err(|p| problems.push(p)).ok();
    let ca = certs(&files.ca, config).map_err(|p| problems.push(p)).ok();
    let (Some(chain), Some(key), Some(ca)) = (chain, key, ca) else {
        return Err(problems);
    };
    let roots = roots(&files.ca, ca, config, &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    let problem = |at: &PathAt, message: String| vec![Problem { file: config.to_path_buf(), line: at.line, message }];
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| problem(&files.ca, format!("{}: {e}", files.ca.path.display())))?;
    let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> =
        if check_host { verifier } else { Arc::new(ChainOnly(verifier)) };
    let client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| problem(&files.cert, e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| {
            problem(&files.key, format!("{} does not fit {}: {e}", files.key.path.display(), files.cert.path.display()))
        })?;
    Ok(Arc::new(client))
}

/// A server verifier that checks the chain (to the CA, validity, usage,
/// signatures) and not the name: `dist_client`'s with `check_host = false`.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        // webpki checks the name last: a name error means the chain is good.
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(NotValidForName | NotValidForNameContext { .. })) => {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A CA file's certificates as a root store (problems noted, not fatal here).
fn roots(at: &PathAt, cas: Vec<CertificateDer<'static>>, config: &Path, problems: &mut Vec<Problem>) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for c in cas {
        if !is_ca(&c).unwrap_or(false) {
            problems.push(Problem {
                file: config.to_path_buf(),
                line: at.line,
                message: format!(
                    "{}: not a CA certificate (no basicConstraints cA=TRUE); name the CA that signs the clusters' certificates (for `wandist certs`, ca.pem), not a leaf certificate",
                    at.path.display()
                ),
            });
            continue;
        }
        if let Err(e) = roots.add(c) {
            problems.push(Problem {
                file: config.to_path_buf(),
                line: at.line,
                message: format!("{}: unusable CA certificate: {e}", at.path.display()),
            });
        }
    }
    roots
}

/// Verifies client chains to `roots`, refusing any certificate a CRL in
/// `crls` revokes (a certificate whose issuer published no CRL here is not
/// refused for that).
fn client_verifier(
    roots: Arc<RootCertStore>,
    crls: &[CertificateRevocationListDer<'static>],
) -> Result<Arc<dyn ClientCertVerifier>, rustls::server::VerifierBuilderError> {
    WebPkiClientVerifier::builder_with_provider(roots, provider())
        .with_crls(crls.iter().cloned())
        .allow_unknown_revocation_status()
        .build()
}

/// Every CRL in a PEM file (at least one).
fn crls(at: &PathAt, config: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, Problem> {
    pem_all(at, config, "X509 CRL", |r| rustls_pemfile::crls(r).collect())
}

/// The name a dialer checks the server certificate against.
pub fn server_name(cluster: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(cluster.to_string()).map_err(|e| format!("{cluster:?} is not a DNS name: {e}"))
}

/// Whether a certificate chain's end entity names `cluster`. Chain validity
/// is the TLS verifier's job; this is the identity half.
pub fn peer_is(chain: &[CertificateDer<'_>], cluster: &str) -> Result<(), String> {
    let end = chain.first().ok_or("no certificate presented")?;
    let parsed = ParsedCertificate::try_from(end).map_err(|e| format!("unparseable certificate: {e}"))?;
    let name = server_name(cluster)?;
    rustls::client::verify_server_name(&parsed, &name)
        .map_err(|_| format!("certificate does not name cluster {cluster:?}"))
}

/// The end of a certificate's validity (notAfter), in unix seconds: a
/// bounded walk of the DER down to TBSCertificate.validity.
pub fn not_after(cert: &CertificateDer<'_>) -> Result<i64, String> {
    let bad = |what: &str| format!("unparseable certificate ({what})");
    let (tag, cert, _) = der(cert.as_ref()).ok_or_else(|| bad("outer"))?;
    let (tbs_tag, tbs, _) = der(cert).filter(|_| tag == 0x30).ok_or_else(|| bad("tbsCertificate"))?;
    if tbs_tag != 0x30 {
        return Err(bad("tbsCertificate"));
    }
    let mut rest = tbs;
    // [0] version (optional), serialNumber, signature, issuer, then validity.
    let mut item = der(rest).ok_or_else(|| bad("version"))?;
    if item.0 == 0xa0 {
        rest = item.2;
        item = der(rest).ok_or_else(|| bad("serial"))?;
    }
    for what in ["signature", "issuer", "validity"] {
        rest = item.2;
        item = der(rest).ok_or_else(|| bad(what))?;
    }
    let (vtag, validity, _) = item;
    if vtag != 0x30 {
        return Err(bad("validity"));
    }
    let (_, _, after) = der(validity).ok_or_else(|| bad("notBefore"))?;
    let (ttag, time, _) = der(after).ok_or_else(|| bad("notAfter"))?;
    let text = std::str::from_utf8(time).map_err(|_| bad("notAfter"))?;
    let digits = |s: &str| s.parse::<i64>().map_err(|_| bad("notAfter"));
    let (year, rest) = match (ttag, text.len()) {
        (0x17, 13) => {
            let yy = digits(&text[..2])?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &text[2..])
        }
        (0x18, 15) => (digits(&text[..4])?, &text[4..]),
        _ => return Err(bad("notAfter time format")),
    };
    if !rest.ends_with('Z') {
        return Err(bad("notAfter time zone"));
    }
    let (mo, d, h, mi, sec) =
        (digits(&rest[0..2])?, digits(&rest[2..4])?, digits(&rest[4..6])?, digits(&rest[6..8])?, digits(&rest[8..10])?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return Err(bad("notAfter out of range"));
    }
    let days = crate::date::days_from_civil(year as i32, mo as u8, d as u8);
    Ok(days * 86_400 + h * 3600 + mi * 60 + sec)
}

/// A certificate's serial number (the INTEGER's content bytes), as a CRL
/// names it.
pub fn serial(cert: &CertificateDer<'_>) -> Result<Vec<u8>, String> {
    let bad = |what: &str| format!("unparseable certificate ({what})");
    let (tag, cert, _) = der(cert.as_ref()).ok_or_else(|| bad("outer"))?;
    let (tbs_tag, tbs, _) = der(cert).filter(|_| tag == 0x30).ok_or_else(|| bad("tbsCertificate"))?;
    if tbs_tag != 0x30 {
        return Err(bad("tbsCertificate"));
    }
    let mut item = der(tbs).ok_or_else(|| bad("version"))?;
    if item.0 == 0xa0 {
        item = der(item.2).ok_or_else(|| bad("serial"))?;
    }
    match item {
        (0x02, serial, _) if !serial.is_empty() => Ok(serial.to_vec()),
        _ => Err(bad("serial")),
    }
}

/// Whether a certificate says it is a CA (basicConstraints cA TRUE): a
/// bounded walk of the DER to TBSCertificate.extensions. A leaf given as a
/// `ca` would be taken by rustls as a trust anchor and trust nothing else.
pub fn is_ca(cert: &CertificateDer<'_>) -> Result<bool, String> {
    const BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1d, 0x13];
    let bad = |what: &str| format!("unparseable certificate ({what})");
    let (tag, cert, _) = der(cert.as_ref()).ok_or_else(|| bad("outer"))?;
    let (tbs_tag, tbs, _) = der(cert).filter(|_| tag == 0x30).ok_or_else(|| bad("tbsCertificate"))?;
    if tbs_tag != 0x30 {
        return Err(bad("tbsCertificate"));
    }
    let mut rest = tbs;
    while let Some((tag, body, next)) = der(rest) {
        rest = next;
        if tag != 0xa3 {
            continue;
        }
        let (seq, mut exts, _) = der(body).ok_or_else(|| bad("extensions"))?;
        if seq != 0x30 {
            return Err(bad("extensions"));
        }
        while let Some((_, ext, next)) = der(exts) {
            exts = next;
            let (oid_tag, oid, mut fields) = der(ext).ok_or_else(|| bad("extension"))?;
            if oid_tag != 0x06 || oid != BASIC_CONSTRAINTS {
                continue;
            }
            let mut item = der(fields).ok_or_else(|| bad("basicConstraints"))?;
            if item.0 == 0x01 {
                fields = item.2;
                item = der(fields).ok_or_else(|| bad("basicConstraints"))?;
            }
            let (octets, value, _) = item;
            let (vseq, value, _) = der(value).filter(|_| octets == 0x04).ok_or_else(|| bad("basicConstraints"))?;
            if vseq != 0x30 {
                return Err(bad("basicConstraints"));
            }
            return Ok(matches!(der(value), Some((0x01, [b], _)) if *b != 0));
        }
        return Ok(false);
    }
    Ok(false)
}

/// One DER item: (tag, contents, what follows). None if malformed.
fn der(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, b) = b.split_first()?;
    let (len, b) = if first < 0x80 {
        (first as usize, b)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        (b[..n].iter().fold(0usize, |acc, x| (acc << 8) | *x as usize), &b[n..])
    };
    (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
}
