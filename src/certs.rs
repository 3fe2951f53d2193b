//! `wandist certs`: a development CA and one certificate per cluster, so a
//! newcomer can try mutual TLS in a minute. Not for production use.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams,
    SanType, SerialNumber,
};

use crate::config::check_cluster_name;

/// Midnight UTC of day `d` since 1970-01-01, as rcgen takes dates.
macro_rules! date {
    ($d:expr) => {{
        let (y, m, d) = crate::date::civil($d);
        rcgen::date_time_ymd(y, m, d)
    }};
}

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{0}")]
    BadCluster(String),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0} holds only half of a CA (ca.pem and ca.key go together): restore the other, or make a new CA with --force (then every cluster's certificates must be made again)")]
    HalfCa(PathBuf),
}

/// Writes a file; a private one is created with mode 0600 from the start
/// (never readable by others, not even for a moment), in a new file
/// renamed over the old, so a key that was once too open is replaced by
/// one that is not.
fn write(path: PathBuf, text: &str, private: bool) -> Result<PathBuf, CertsError> {
    let io = |source| CertsError::Io { path: path.clone(), source };
    if !private {
        std::fs::write(&path, text).map_err(io)?;
        return Ok(path);
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        open.mode(0o600);
    }
    let written = open.open(&tmp).and_then(|mut f| {
        use std::io::Write;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, &path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(path)
}

/// Validity of the cluster certificates `wandist certs` makes by default.
pub const DEFAULT_DAYS: i64 = 825;

/// Writes DIR/ca.pem, DIR/ca.key and DIR/CLUSTER.{pem,key}, the cluster
/// certificates valid for DEFAULT_DAYS from yesterday; returns the paths written.
pub fn generate(out: &Path, clusters: &[String]) -> Result<Vec<PathBuf>, CertsError> {
    generate_valid_for(out, clusters, DEFAULT_DAYS)
}

/// As `generate`, with the cluster certificates valid from yesterday until
/// `days` days from today. `days` ≤ 0 makes certificates that have already
/// expired (valid for 30 days that ended `-days` days ago), for rehearsing
/// expiry and for tests. A CA already in DIR signs them (it is kept: the
/// clusters it signed before stay valid); with none, a new one is made.
pub fn generate_valid_for(out: &Path, clusters: &[String], days: i64) -> Result<Vec<PathBuf>, CertsError> {
    make(out, clusters, days, false)
}

/// As `generate_valid_for`, with a new CA even if DIR has one (`certs
/// --force`): every cluster's certificates must then be made again.
pub fn generate_with_new_ca(out: &Path, clusters: &[String], days: i64) -> Result<Vec<PathBuf>, CertsError> {
    make(out, clusters, days, true)
}

fn make(out: &Path, clusters: &[String], days: i64, new_ca: bool) -> Result<Vec<PathBuf>, CertsError> {
    let today = crate::date::today();
    let (from, until) = if days > 0 { (today - 1, today + days) } else { (today + days - 30, today + days) };
    for c in clusters {
        check_cluster_name(c).map_err(CertsError::BadCluster)?;
    }
    std::fs::create_dir_all(out).map_err(|source| CertsError::Io { path: out.to_path_buf(), source })?;
    let mut written = Vec::new();

    let (pem_path, key_path) = (out.join("ca.pem"), out.join("ca.key"));
    let issuer = match (pem_path.exists(), key_path.exists()) {
        (true, true) if !new_ca => {
            let text =
                std::fs::read_to_string(&key_path).map_err(|source| CertsError::Io { path: key_path, source })?;
            Issuer::new(ca_params()?, KeyPair::from_pem(&text)?)
        }
        (true, false) | (false, true) if !new_ca => return Err(CertsError::HalfCa(out.to_path_buf())),
        _ => {
            let ca_key = KeyPair::generate()?;
            let ca_params = ca_params()?;
            let ca_cert = ca_params.self_signed(&ca_key)?;
            written.push(write(pem_path, &ca_cert.pem(), false)?);
            written.push(write(key_path, &ca_key.serialize_pem(), true)?);
            Issuer::new(ca_params, ca_key)
        }
    };
    for cluster in clusters {
        written.extend(issue(out, cluster, &issuer, from, until)?);
    }
    Ok(written)
}

/// The development CA's parameters (the same every time, so that its key
/// alone can sign a CRL the CA certificate verifies).
fn ca_params() -> Result<CertificateParams, CertsError> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "wandist development CA");
    ca_params.distinguished_name = dn;
    Ok(ca_params)
}

/// Writes DIR/CLUSTER.{pem,key}: a new key, and a certificate naming the
/// cluster, signed by `issuer`, valid over the days `from` to `until`.
fn issue(
    out: &Path,
    cluster: &str,
    issuer: &Issuer<'_, KeyPair>,
    from: i64,
    until: i64,
) -> Result<Vec<PathBuf>, CertsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![cluster.to_string(), "localhost".to_string()])?;
    params.subject_alt_names.push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cluster);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = date!(from);
    params.not_after = date!(until);
    let cert = params.signed_by(&key, issuer)?;
    Ok(vec![
        write(out.join(format!("{cluster}.pem")), &cert.pem(), false)?,
        write(out.join(format!("{cluster}.key")), &key.serialize_pem(), true)?,
    ])
}

/// `wandist certs --revoke`: for each cluster, revokes its current
/// certificate in DIR (made by `generate`, signed by DIR/ca.key) and
/// issues it a new key and certificate, valid for `days`. Every serial
/// ever revoked is kept in DIR/revoked (hex, one per line), and DIR/crl.pem
/// lists them all, valid for `days`: give it to every gateway as
/// `tls.crl`, and the new certificate and key to the cluster.
pub fn revoke(out: &Path, clusters: &[String], days: i64) -> Result<Vec<PathBuf>, CertsError> {
    for c in clusters {
        check_cluster_name(c).map_err(CertsError::BadCluster)?;
    }
    let read = |name: &str| {
        let path = out.join(name);
        std::fs::read_to_string(&path).map_err(|source| CertsError::Io { path, source })
    };
    let ca_key = KeyPair::from_pem(&read("ca.key")?)?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let revoked_path = out.join("revoked");
    let mut serials: Vec<String> = match std::fs::read_to_string(&revoked_path) {
        Ok(text) => text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => return Err(CertsError::Io { path: revoked_path, source }),
    };
    let today = crate::date::today();
    let mut written = Vec::new();
    for cluster in clusters {
        let pem = read(&format!("{cluster}.pem"))?;
        let der = rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| CertsError::BadCluster(format!("{cluster}.pem holds no certificate")))?;
        let serial = crate::tls::serial(&der).map_err(CertsError::BadCluster)?;
        let hex: String = serial.iter().map(|b| format!("{b:02x}")).collect();
        if !serials.contains(&hex) {
            serials.push(hex);
        }
        written.extend(issue(out, cluster, &issuer, today - 1, today + days)?);
    }
    write(revoked_path.clone(), &serials.iter().map(|s| format!("{s}\n")).collect::<String>(), false)?;
    written.push(revoked_path);
    let revoked_certs = serials
        .iter()
        .map(|hex| {
            let bytes: Vec<u8> =
                (0..hex.len() / 2).filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()).collect();
            RevokedCertParams {
                serial_number: SerialNumber::from_slice(&bytes),
                revocation_time: date!(today - 1),
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            }
        })
        .collect();
    let crl = CertificateRevocationListParams {
        this_update: date!(today - 1),
        next_update: date!(today + days),
        crl_number: SerialNumber::from(serials.len() as u64),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)?;
    written.push(write(out.join("crl.pem"), &crl.pem()?, false)?);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PathAt, TlsFiles};
    use crate::tls::{peer_is, Tls};

    #[test]
    fn generated_certificates_load_and_name_their_cluster() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &["dc1".into(), "dc2".into()]).unwrap();
        let at = |f: &str| PathAt { path: dir.path().join(f), line: None };
        let files = TlsFiles::new(at("dc1.pem"), at("dc1.key"), at("ca.pem"));
        Tls::load(&files, Some("dc1"), Path::new("x.toml")).unwrap();
        let problems = Tls::load(&files, Some("dc2"), Path::new("x.toml")).unwrap_err();
        assert!(problems[0].message.contains("does not name cluster \"dc2\""), "{problems:?}");

        let pem = std::fs::read(dir.path().join("dc2.pem")).unwrap();
        let chain: Vec<_> = rustls_pemfile::certs(&mut &pem[..]).collect::<Result<_, _>>().unwrap();
        peer_is(&chain, "dc2").unwrap();
        peer_is(&chain, "localhost").unwrap();
        assert!(peer_is(&chain, "dc1").is_err());
    }

    #[test]
    fn validity_is_read_back_and_an_expired_own_certificate_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        let today = crate::date::today();
        for days in [10, 825, -1] {
            generate_valid_for(dir.path(), &["dc1".into()], days).unwrap();
            let pem = std::fs::read(dir.path().join("dc1.pem")).unwrap();
            let chain: Vec<_> = rustls_pemfile::certs(&mut &pem[..]).collect::<Result<_, _>>().unwrap();
            assert_eq!(crate::tls::not_after(&chain[0]).unwrap(), (today + days) * 86_400, "{days} days");
            // Every truncation is an error, never a panic.
            for end in 0..chain[0].len() {
                let cut = rustls::pki_types::CertificateDer::from(&chain[0][..end]);
                assert!(crate::tls::not_after(&cut).is_err(), "a certificate cut at {end} bytes parsed");
            }
        }
        let at = |f: &str| PathAt { path: dir.path().join(f), line: Some(4) };
        let files = TlsFiles::new(at("dc1.pem"), at("dc1.key"), at("ca.pem"));
        let problems = Tls::load(&files, Some("dc1"), Path::new("x.toml")).unwrap_err();
        let expired = crate::date::ymd((today - 1) * 86_400);
        assert!(problems[0].message.contains(&format!("certificate expired on {expired}")), "{problems:?}");
        assert_eq!(problems[0].line, Some(4));
    }

    /// Keys are 0600 from the moment they exist, even where an old key
    /// was more open; a key others may read is refused when loaded.
    #[test]
    fn keys_are_private_and_open_keys_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("dc1.key"), "old").unwrap();
        std::fs::set_permissions(dir.path().join("dc1.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
        generate(dir.path(), &["dc1".into()]).unwrap();
        let mode = |f: &str| std::fs::metadata(dir.path().join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode("ca.key"), mode("dc1.key"), mode("dc1.pem")), (0o600, 0o600, 0o644));
        assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("tmp")));
        let at = |f: &str| PathAt { path: dir.path().join(f), line: Some(2) };
        let files = TlsFiles::new(at("dc1.pem"), at("dc1.key"), at("ca.pem"));
        Tls::load(&files, Some("dc1"), Path::new("x.toml")).unwrap();
        std::fs::set_permissions(dir.path().join("dc1.key"), std::fs::Permissions::from_mode(0o640)).unwrap();
        let problems = Tls::load(&files, Some("dc1"), Path::new("x.toml")).unwrap_err();
        assert!(problems[0].message.contains("mode 0640"), "{problems:?}");
    }

    #[test]
    fn bad_cluster_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(generate(dir.path(), &["DC1".into()]), Err(CertsError::BadCluster(_))));
    }

    #[test]
    fn a_key_from_another_pair_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &["dc1".into(), "dc2".into()]).unwrap();
        let at = |f: &str| PathAt { path: dir.path().join(f), line: Some(3) };
        let files = TlsFiles::new(at("dc1.pem"), at("dc2.key"), at("missing.pem"));
        let problems = Tls::load(&files, Some("dc1"), Path::new("x.toml")).unwrap_err();
        assert!(problems.iter().any(|p| p.message.contains("missing.pem")), "{problems:?}");
        let files = TlsFiles::new(at("dc1.pem"), at("dc2.key"), at("ca.pem"));
        let problems = Tls::load(&files, Some("dc1"), Path::new("x.toml")).unwrap_err();
        assert!(problems.iter().any(|p| p.message.contains("does not fit")), "{problems:?}");
    }

    fn chain(path: &Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        let pem = std::fs::read(path).unwrap();
        rustls_pemfile::certs(&mut &pem[..]).collect::<Result<_, _>>().unwrap()
    }

    /// `--revoke`: the old certificate is refused, its replacement (same
    /// CA) accepted, others untouched; revocations accumulate.
    #[test]
    fn revoked_certificates_are_refused_and_reissued_ones_accepted() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &["dc1".into(), "dc2".into(), "dc3".into()]).unwrap();
        let old2 = chain(&dir.path().join("dc2.pem"));
        revoke(dir.path(), &["dc2".into()], 30).unwrap();
        let new2 = chain(&dir.path().join("dc2.pem"));
        assert_ne!(crate::tls::serial(&old2[0]).unwrap(), crate::tls::serial(&new2[0]).unwrap());
        let at = |f: &str| PathAt { path: dir.path().join(f), line: None };
        let mut files = TlsFiles::new(at("dc1.pem"), at("dc1.key"), at("ca.pem"));
        let without_crl = Tls::load(&files, Some("dc1"), Path::new("x.toml")).unwrap();
        without_crl.verify_peer(&old2, "dc2").unwrap();
        files.crl = Some(at("crl.pem"));
        let tls = Tls::load(&files, Some("dc1"), Path::new("x.toml")).unwrap();
        let err = tls.verify_peer(&old2, "dc2").unwrap_err();
        assert!(err.contains("Revoked"), "{err}");
        tls.verify_peer(&new2, "dc2").unwrap();
        let dc3 = chain(&dir.path().join("dc3.pem"));
        tls.verify_peer(&dc3, "dc3").unwrap();
        // A second revocation keeps the first.
        revoke(dir.path(), &["dc3".into()], 30).unwrap();
        let tls = Tls::load(&files, Some("dc1"), Path::new("x.toml")).unwrap();
        assert!(tls.verify_peer(&old2, "dc2").is_err() && tls.verify_peer(&dc3, "dc3").is_err());
        tls.verify_peer(&chain(&dir.path().join("dc3.pem")), "dc3").unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("revoked")).unwrap().lines().count(), 2);
        // A CRL file with no CRL in it is a problem, with its line.
        std::fs::write(dir.path().join("empty.pem"), "").unwrap();
        files.crl = Some(PathAt { path: dir.path().join("empty.pem"), line: Some(9) });
        let problems = Tls::load(&files, Some("dc1"), Path::new("x.toml")).unwrap_err();
        assert!(problems[0].message.contains("no X509 CRL") && problems[0].line == Some(9), "{problems:?}");
    }

    /// A route's own CA vouches for that peer only, and that peer only
    /// through it: a partner's CA cannot mint another peer, and our CA
    /// cannot stand in for the partner's.
    #[test]
    fn a_route_ca_vouches_for_its_own_peer_only() {
        let ours = tempfile::tempdir().unwrap();
        let partner = tempfile::tempdir().unwrap();
        generate(ours.path(), &["dc1".into(), "dc2".into(), "dc3".into()]).unwrap();
        generate(partner.path(), &["dc3".into(), "dc2".into()]).unwrap();
        let at = |d: &Path, f: &str| PathAt { path: d.join(f), line: None };
        let mut files =
            TlsFiles::new(at(ours.path(), "dc1.pem"), at(ours.path(), "dc1.key"), at(ours.path(), "ca.pem"));
        files.route_cas = vec![("dc3".into(), at(partner.path(), "ca.pem"))];
        let tls = Tls::load(&files, Some("dc1"), Path::new("x.toml")).unwrap();
        tls.verify_peer(&chain(&partner.path().join("dc3.pem")), "dc3").unwrap();
        tls.verify_peer(&chain(&ours.path().join("dc2.pem")), "dc2").unwrap();
        let err = tls.verify_peer(&chain(&partner.path().join("dc2.pem")), "dc2").unwrap_err();
        // (Both development CAs have one name: the signature tells them apart.)
        assert!(err.contains("under tls.ca") && err.contains("BadSignature"), "{err}");
        let err = tls.verify_peer(&chain(&ours.path().join("dc3.pem")), "dc3").unwrap_err();
        assert!(err.contains("under the route's own ca"), "{err}");
        // Dialing: each route's configuration is its own.
        assert!(!std::sync::Arc::ptr_eq(tls.client_for("dc3"), tls.client_for("dc2")));
        assert!(std::sync::Arc::ptr_eq(tls.client_for("dc2"), &tls.client));
    }
}
