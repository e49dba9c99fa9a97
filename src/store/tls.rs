//! TLS to PostgreSQL with rustls, configured from the database URL as libpq
//! users write it: `sslmode=disable|prefer|require|verify-ca|verify-full`,
//! `sslrootcert`, `sslcert` and `sslkey`. tokio-postgres knows only
//! `disable`, `prefer` and `require` and no certificate files, so these
//! parameters are taken out of the URL here and turned into a rustls
//! configuration; the pool, the member sessions and the listener all
//! connect with it.
//!
//! As in libpq: `prefer` (the default) and `require` encrypt without
//! checking the server's certificate, unless `sslrootcert` is given, which
//! makes `require` check it like `verify-ca`; `verify-ca` checks that a
//! trusted CA signed it; `verify-full` also checks the host name.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

/// How the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verify {
    /// Encrypted, but any certificate is accepted (`prefer`, `require`).
    Nothing,
    /// Signed by a trusted CA, whatever host name it names.
    Ca,
    /// Signed by a trusted CA and naming the host connected to.
    Full,
}

/// The TLS settings of a database URL, and the URL without them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsSettings {
    pub url: String,
    pub mode: SslMode,
    pub verify: Verify,
    pub root_cert: Option<String>,
    pub client_cert: Option<(String, String)>,
}

/// A URL's TLS settings that cannot work; the message names the parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsError(pub String);

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

const TLS_PARAMS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Takes the TLS parameters out of a URL (`postgresql://...?sslmode=...`)
/// or a key-value string (`host=... sslmode=...`).
pub(crate) fn split_url(url: &str) -> Result<TlsSettings, TlsError> {
    let (rest, params) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        split_uri(url)?
    } else {
        split_key_value(url)
    };
    let get = |k: &str| params.iter().find(|(p, _)| p == k).map(|(_, v)| v.clone());
    let root_cert = get("sslrootcert");
    let (mode, verify) = match get("sslmode").as_deref() {
        None | Some("prefer") => (SslMode::Prefer, Verify::Nothing),
        Some("disable") => (SslMode::Disable, Verify::Nothing),
        Some("require") if root_cert.is_some() => (SslMode::Require, Verify::Ca),
        Some("require") => (SslMode::Require, Verify::Nothing),
        Some("verify-ca") => (SslMode::Require, Verify::Ca),
        Some("verify-full") => (SslMode::Require, Verify::Full),
        Some(other) => {
            return Err(TlsError(format!(
                "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
            )))
        }
    };
    if verify != Verify::Nothing && root_cert.is_none() {
        return Err(TlsError(
            "sslmode=verify-ca and verify-full need sslrootcert=FILE (the CA's certificate, PEM)"
                .into(),
        ));
    }
    let client_cert = match (get("sslcert"), get("sslkey")) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => return Err(TlsError("sslcert and sslkey go together".into())),
    };
    Ok(TlsSettings {
        url: rest,
        mode,
        verify,
        root_cert,
        client_cert,
    })
}

fn split_uri(url: &str) -> Result<(String, Vec<(String, String)>), TlsError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), Vec::new()));
    };
    let mut kept = Vec::new();
    let mut tls = Vec::new();
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        if TLS_PARAMS.contains(&k.as_ref()) {
            tls.push((k.into_owned(), v.into_owned()));
        } else {
            kept.push((k.into_owned(), v.into_owned()));
        }
    }
    if kept.is_empty() {
        return Ok((base.to_string(), tls));
    }
    let query = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(kept)
        .finish();
    Ok((format!("{base}?{query}"), tls))
}

fn split_key_value(text: &str) -> (String, Vec<(String, String)>) {
    let mut kept = Vec::new();
    let mut tls = Vec::new();
    for token in text.split_whitespace() {
        match token.split_once('=') {
            Some((k, v)) if TLS_PARAMS.contains(&k) => tls.push((k.to_string(), v.to_string())),
            _ => kept.push(token),
        }
    }
    (kept.join(" "), tls)
}

/// The TLS connector of every connection: rustls, except that a
/// Unix-domain socket (for which tokio-postgres passes an empty host name,
/// not a valid server name) gets a placeholder name; such a connection does
/// not use TLS (`mode_for`), so the name is never checked.
#[derive(Clone)]
pub(crate) struct MakeTls(pub MakeRustlsConnect);

impl<S> MakeTlsConnect<S> for MakeTls
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = <MakeRustlsConnect as MakeTlsConnect<S>>::Stream;
    type TlsConnect = <MakeRustlsConnect as MakeTlsConnect<S>>::TlsConnect;
    type Error = <MakeRustlsConnect as MakeTlsConnect<S>>::Error;

    fn make_tls_connect(&mut self, hostname: &str) -> Result<Self::TlsConnect, Self::Error> {
        let name = if hostname.is_empty() {
            "localhost"
        } else {
            hostname
        };
        MakeTlsConnect::<S>::make_tls_connect(&mut self.0, name)
    }
}

/// The mode to connect with: as in libpq, a connection over Unix-domain
/// sockets never uses TLS (whatever `sslmode` says), so a URL whose hosts
/// are all socket directories connects without it.
pub(crate) fn mode_for(hosts: &[tokio_postgres::config::Host], mode: SslMode) -> SslMode {
    let all_sockets = !hosts.is_empty()
        && hosts
            .iter()
            .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)));
    if all_sockets {
        SslMode::Disable
    } else {
        mode
    }
}

/// The rustls configuration of these settings (read from the files they
/// name).
pub(crate) fn client_config(s: &TlsSettings) -> Result<ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(format!("TLS: {e}")))?;
    let webpki = match (&s.root_cert, s.verify) {
        (Some(path), verify) if verify != Verify::Nothing => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs("sslrootcert", path)? {
                roots
                    .add(cert)
                    .map_err(|e| TlsError(format!("sslrootcert {path}: {e}")))?;
            }
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| TlsError(format!("sslrootcert {path}: {e}")))?;
            Some(webpki)
        }
        _ => None,
    };
    let verifier = Arc::new(Verifier {
        webpki,
        check_name: s.verify == Verify::Full,
        provider,
    });
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match &s.client_cert {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let certs = read_certs("sslcert", cert)?;
            let key = read_key(key)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| TlsError(format!("sslcert/sslkey: {e}")))
        }
    }
}

fn read_pem(what: &str, path: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError(format!("{what}={path}: {e}")))
}

fn read_certs(what: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(what, path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("{what}={path}: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError(format!("{what}={path} holds no PEM certificate")));
    }
    Ok(certs)
}

fn read_key(path: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_pem("sslkey", path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| TlsError(format!("sslkey={path}: {e}")))?
        .ok_or_else(|| TlsError(format!("sslkey={path} holds no PEM private key")))
}

/// The server certificate check: with `webpki`, the chain must lead to a
/// trusted CA (`verify-ca`), and name the host if `check_name`
/// (`verify-full`); without, any certificate is accepted (`prefer`,
/// `require`). The handshake's signatures are checked either way.
#[derive(Debug)]
struct Verifier {
    webpki: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                ..
            })) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_parameters_leave_the_url_and_set_mode_and_checks_as_libpq_does() {
        let s = split_url(
            "postgresql://u@h:5432/db?sslmode=verify-full&sslrootcert=%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(s.url, "postgresql://u@h:5432/db?application_name=x");
        assert_eq!((s.mode, s.verify), (SslMode::Require, Verify::Full));
        assert_eq!(s.root_cert.as_deref(), Some("/ca.pem"));
        let s = split_url("postgresql://u@h/db").unwrap();
        assert_eq!((s.mode, s.verify), (SslMode::Prefer, Verify::Nothing));
        let s = split_url("postgresql://u@h/db?sslmode=require&sslrootcert=/ca").unwrap();
        assert_eq!(
            s.verify,
            Verify::Ca,
            "require with a root certificate checks the CA"
        );
        assert_eq!(s.url, "postgresql://u@h/db");
        let s = split_url("host=h sslmode=disable user=u").unwrap();
        assert_eq!(
            (s.url.as_str(), s.mode),
            ("host=h user=u", SslMode::Disable)
        );
        let socket = "postgresql://u@%2Ftmp%2Fpg:5432/db".parse::<tokio_postgres::Config>();
        let socket = socket.unwrap();
        assert_eq!(
            mode_for(socket.get_hosts(), SslMode::Require),
            SslMode::Disable
        );
        let tcp = "postgresql://u@localhost:5432/db".parse::<tokio_postgres::Config>();
        assert_eq!(
            mode_for(tcp.unwrap().get_hosts(), SslMode::Prefer),
            SslMode::Prefer
        );
        for bad in [
            "postgresql://h/db?sslmode=verify-full",
            "postgresql://h/db?sslmode=allow-ish",
            "postgresql://h/db?sslmode=require&sslcert=/c",
        ] {
            assert!(split_url(bad).is_err(), "{bad}");
        }
    }
}
