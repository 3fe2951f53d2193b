//! TLS material: loading PEM files into rustls configurations for both
//! directions (mutual TLS), and checking that a peer's certificate names the
//! cluster it claims to be.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::{PathAt, Problem, TlsFiles};

/// ALPN protocol id, so a wandist port is never mistaken for something else.
pub const ALPN: &[u8] = b"wandist/1";
/// PEM files larger than this are refused rather than read.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// Ready-to-use configurations for dialing and accepting.
#[derive(Clone)]
pub struct Tls {
    pub client: Arc<ClientConfig>,
    pub server: Arc<ServerConfig>,
    /// When this gateway's own certificate expires (unix seconds).
    pub not_after: i64,
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
    let pem = read_pem(at, config)?;
    let problem = |message: String| Problem { file: config.to_path_buf(), line: at.line, message };
    let certs: Vec<_> = rustls_pemfile::certs(&mut BufReader::new(&pem[..]))
        .collect::<Result<_, _>>()
        .map_err(|e| problem(format!("{}: bad PEM: {e}", at.path.display())))?;
    if certs.is_empty() {
        return Err(problem(format!("{}: no CERTIFICATE found", at.path.display())));
    }
    Ok(certs)
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
        let mut roots = RootCertStore::empty();
        for c in ca {
            if let Err(e) = roots.add(c) {
                problems.push(problem(&files.ca, format!("{}: unusable CA certificate: {e}", files.ca.path.display())));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| vec![problem(&files.ca, format!("{}: {e}", files.ca.path.display()))])?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| vec![problem(&files.cert, e.to_string())])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| {
                vec![problem(
                    &files.key,
                    format!("{} does not fit {}: {e}", files.key.path.display(), files.cert.path.display()),
                )]
            })?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| vec![problem(&files.cert, e.to_string())])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| {
                vec![problem(
                    &files.key,
                    format!("{} does not fit {}: {e}", files.key.path.display(), files.cert.path.display()),
                )]
            })?;
        client.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Tls { client: Arc::new(client), server: Arc::new(server), not_after })
    }
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
