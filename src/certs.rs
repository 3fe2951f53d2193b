//! `wandist certs`: a development CA and one certificate per cluster, so a
//! newcomer can try mutual TLS in a minute. Not for production use.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::config::check_cluster_name;

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{0}")]
    BadCluster(String),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
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
/// expiry and for tests.
pub fn generate_valid_for(out: &Path, clusters: &[String], days: i64) -> Result<Vec<PathBuf>, CertsError> {
    let today = crate::date::today();
    let (from, until) = if days > 0 { (today - 1, today + days) } else { (today + days - 30, today + days) };
    let date = |d: i64| {
        let (y, m, d) = crate::date::civil(d);
        rcgen::date_time_ymd(y, m, d)
    };
    for c in clusters {
        check_cluster_name(c).map_err(CertsError::BadCluster)?;
    }
    std::fs::create_dir_all(out).map_err(|source| CertsError::Io { path: out.to_path_buf(), source })?;
    let mut written = Vec::new();

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "wandist development CA");
    ca_params.distinguished_name = dn;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    written.push(write(out.join("ca.pem"), &ca_cert.pem(), false)?);
    written.push(write(out.join("ca.key"), &ca_key.serialize_pem(), true)?);
    let issuer = Issuer::new(ca_params, ca_key);

    for cluster in clusters {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![cluster.clone(), "localhost".to_string()])?;
        params.subject_alt_names.push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cluster.as_str());
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = date(from);
        params.not_after = date(until);
        let cert = params.signed_by(&key, &issuer)?;
        written.push(write(out.join(format!("{cluster}.pem")), &cert.pem(), false)?);
        written.push(write(out.join(format!("{cluster}.key")), &key.serialize_pem(), true)?);
    }
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
        let files = TlsFiles { cert: at("dc1.pem"), key: at("dc1.key"), ca: at("ca.pem") };
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
        let files = TlsFiles { cert: at("dc1.pem"), key: at("dc1.key"), ca: at("ca.pem") };
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
        let files = TlsFiles { cert: at("dc1.pem"), key: at("dc1.key"), ca: at("ca.pem") };
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
        let files = TlsFiles { cert: at("dc1.pem"), key: at("dc2.key"), ca: at("missing.pem") };
        let problems = Tls::load(&files, Some("dc1"), Path::new("x.toml")).unwrap_err();
        assert!(problems.iter().any(|p| p.message.contains("missing.pem")), "{problems:?}");
        let files = TlsFiles { cert: at("dc1.pem"), key: at("dc2.key"), ca: at("ca.pem") };
        let problems = Tls::load(&files, Some("dc1"), Path::new("x.toml")).unwrap_err();
        assert!(problems.iter().any(|p| p.message.contains("does not fit")), "{problems:?}");
    }
}
