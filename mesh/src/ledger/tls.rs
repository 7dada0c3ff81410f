//! TLS to the shared ledger's PostgreSQL, with rustls: the URL's `sslmode` in libpq's meaning
//! and `sslrootcert`, the CA file a `verify-ca` or `verify-full` connection checks against.

use std::{path::Path, str::FromStr, sync::Arc};

use anyhow::{bail, Context};
use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        WebPkiServerVerifier,
    },
    crypto::{ring, CryptoProvider},
    pki_types::{pem::PemObject, CertificateDer, ServerName, UnixTime},
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// What a connection asks of TLS (`sslmode`, libpq's names and meanings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `disable`: plain TCP.
    Disable,
    /// `prefer` (the default): TLS when the server offers it, unverified; plain otherwise.
    Prefer,
    /// `require`: TLS or no connection; the certificate is not checked (checked against
    /// `sslrootcert` when one is given, as `verify-ca`).
    Require,
    /// `verify-ca`: TLS, and the certificate chains to `sslrootcert`.
    VerifyCa,
    /// `verify-full`: `verify-ca`, and the certificate names the host connected to.
    VerifyFull,
}

impl FromStr for Mode {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Mode> {
        Ok(match s {
            "disable" => Mode::Disable,
            "allow" | "prefer" => Mode::Prefer,
            "require" => Mode::Require,
            "verify-ca" => Mode::VerifyCa,
            "verify-full" => Mode::VerifyFull,
            other => bail!(
                "ledger.postgres: sslmode={other} is not one of disable, prefer, require, \
                 verify-ca, verify-full"
            ),
        })
    }
}

/// Where the shared ledger is and how to reach it.
#[derive(Clone)]
pub struct Target {
    pub config: tokio_postgres::Config,
    pub mode: Mode,
    /// The connector (`None` with `sslmode=disable`).
    tls: Option<MakeRustlsConnect>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Target({:?}, {:?})", self.config.get_hosts(), self.mode)
    }
}

impl Target {
    /// The connection settings of `url`: libpq's `sslmode` and `sslrootcert` are read here
    /// (the CA file is loaded now, so a missing one is an error at start), the rest by
    /// tokio-postgres. Client certificates (`sslcert`, `sslkey`) are refused by name. No
    /// message shows the URL's password.
    pub fn parse(url: &str) -> anyhow::Result<Target> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            bail!("ledger.postgres: must be a postgres:// or postgresql:// URL");
        }
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let (mut mode, mut root) = (Mode::Prefer, None);
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "sslmode" => mode = v.parse()?,
                "sslrootcert" => root = Some(percent_decode(v)?),
                "sslcert" | "sslkey" | "sslpassword" | "sslcrl" => bail!(
                    "ledger.postgres: {k} is not supported: the agent does not present a client \
                     certificate to PostgreSQL (use password or SCRAM login over TLS)"
                ),
                _ => rest.push(pair),
            }
        }
        let url = match rest.is_empty() {
            true => base.to_string(),
            false => format!("{base}?{}", rest.join("&")),
        };
        let mut config = tokio_postgres::Config::from_str(&url)
            .map_err(|e| anyhow::anyhow!("ledger.postgres: not a valid PostgreSQL URL: {e}"))?;
        if config.get_hosts().is_empty() {
            bail!("ledger.postgres: the URL names no host");
        }
        config.ssl_mode(match mode {
            Mode::Disable => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        });
        let roots = match (&root, mode) {
            (Some(path), _) => Some(roots(Path::new(path))?),
            (None, Mode::VerifyCa | Mode::VerifyFull) => {
                let name = if mode == Mode::VerifyCa {
                    "verify-ca"
                } else {
                    "verify-full"
                };
                bail!(
                    "ledger.postgres: sslmode={name} needs sslrootcert=<path of the CA \
                     certificate(s), PEM> to check the server's certificate against"
                )
            }
            (None, _) => None,
        };
        // libpq: `require` with a root certificate checks the chain, as `verify-ca`.
        if mode == Mode::Require && roots.is_some() {
            mode = Mode::VerifyCa;
        }
        let tls = match mode {
            Mode::Disable => None,
            _ => Some(MakeRustlsConnect::new(client_config(mode, roots)?)),
        };
        Ok(Target { config, mode, tls })
    }

    /// Connect with this target's TLS.
    pub async fn connect(
        &self,
        config: &tokio_postgres::Config,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        match &self.tls {
            None => {
                let (client, conn) = config.connect(tokio_postgres::NoTls).await?;
                spawn_connection(conn);
                Ok(client)
            }
            Some(tls) => {
                let (client, conn) = config.connect(tls.clone()).await?;
                spawn_connection(conn);
                Ok(client)
            }
        }
    }
}

fn spawn_connection<F>(connection: F)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "The shared ledger's connection ended");
        }
    });
}

/// `%xx` escapes of a URL's query value decoded (a path may hold spaces or `&`).
fn percent_decode(v: &str) -> anyhow::Result<String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = v
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .context("ledger.postgres: sslrootcert has a bad %-escape")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).context("ledger.postgres: sslrootcert is not UTF-8")
}

/// The CA certificates of a PEM file.
fn roots(path: &Path) -> anyhow::Result<RootCertStore> {
    let shown = path.display();
    let mut store = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("ledger.postgres: cannot read sslrootcert {shown}"))?;
    for cert in certs {
        let cert =
            cert.with_context(|| format!("ledger.postgres: sslrootcert {shown} is not PEM"))?;
        store
            .add(cert)
            .with_context(|| format!("ledger.postgres: a certificate in {shown} is not valid"))?;
    }
    if store.is_empty() {
        bail!("ledger.postgres: sslrootcert {shown} holds no certificate");
    }
    Ok(store)
}

fn client_config(mode: Mode, roots: Option<RootCertStore>) -> anyhow::Result<ClientConfig> {
    let provider = Arc::new(ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("ledger.postgres: no TLS protocol version in common")?;
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, roots) {
        (Mode::VerifyFull, Some(roots)) => {
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build()?
        }
        (Mode::VerifyCa, Some(roots)) => Arc::new(AnyName(
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build()?,
        )),
        _ => Arc::new(Unverified(provider)),
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// `prefer` and `require` without a root certificate: encrypted, the peer not checked (as
/// libpq does; the handshake's signatures are still checked).
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain is checked, the name in the certificate is not.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(url: &str) -> String {
        Target::parse(url).unwrap_err().to_string()
    }

    #[test]
    fn modes_and_root_certificates_are_read_from_the_url() {
        let t = Target::parse("postgres://u:pw@127.0.0.1:5432/ledger?sslmode=disable").unwrap();
        assert_eq!((t.mode, t.tls.is_none()), (Mode::Disable, true));
        assert_eq!(t.config.get_dbname(), Some("ledger"));
        let t = Target::parse("postgres://u:pw@db/l").unwrap();
        assert_eq!(t.mode, Mode::Prefer);
        let t = Target::parse("postgres://u:pw@db/l?sslmode=require&application_name=x").unwrap();
        assert_eq!(t.mode, Mode::Require);
        assert_eq!(t.config.get_application_name(), Some("x"));
        let e = err("postgres://u:secret@db/l?sslmode=verify-full");
        assert!(e.contains("sslmode=verify-full needs sslrootcert"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        let e = err("postgres://u:secret@db/l?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem");
        assert!(
            e.contains("cannot read sslrootcert /nonexistent/ca.pem"),
            "{e}"
        );
        let e = err("postgres://u:secret@db/l?sslmode=require&sslcert=/c.pem");
        assert!(
            e.starts_with("ledger.postgres: sslcert is not supported"),
            "{e}"
        );
        assert!(err("postgres://db/l?sslmode=bogus").contains("sslmode=bogus is not one of"));
        assert!(err("mysql://db/l").contains("postgres://"));
        assert_eq!(percent_decode("/a%20b/c%26d.pem").unwrap(), "/a b/c&d.pem");
    }
}
