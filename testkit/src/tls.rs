//! Certificates for a test etcd with TLS, made at test time with the `openssl` command (never
//! committed): a CA, a server certificate for `127.0.0.1`/`localhost`, a client certificate.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::TestkitError;

/// The files of a TLS setup, in the cluster's temporary directory.
#[derive(Debug, Clone)]
pub(crate) struct TlsFiles {
    pub(crate) ca: PathBuf,
    pub(crate) server_cert: PathBuf,
    pub(crate) server_key: PathBuf,
    pub(crate) client_cert: PathBuf,
    pub(crate) client_key: PathBuf,
    /// Whether etcd requires client certificates (`--client-cert-auth`).
    pub(crate) client_cert_auth: bool,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<(), TestkitError> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .map_err(|e| TestkitError::Start(format!("cannot run openssl (needed for TLS): {e}")))?;
    if !out.status.success() {
        return Err(TestkitError::Start(format!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// A CA `name` (`name.pem`, `name.key`) in `dir`.
pub(crate) fn make_ca(dir: &Path, name: &str) -> Result<(), TestkitError> {
    let (pem, key) = (format!("{name}.pem"), format!("{name}.key"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            "/CN=etcd-coord-test-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    )
}

/// A certificate `name` signed by the CA `ca`, for `usage` (`serverAuth` / `clientAuth`).
fn make_cert(dir: &Path, ca: &str, name: &str, usage: &str) -> Result<(), TestkitError> {
    let ext = format!("{name}.ext");
    std::fs::write(
        dir.join(&ext),
        format!(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        ),
    )?;
    let (csr, key, pem) = (
        format!("{name}.csr"),
        format!("{name}.key"),
        format!("{name}.pem"),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ],
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
    )
}

/// A CA and server and client certificates in `dir`.
pub(crate) fn make(dir: &Path, client_cert_auth: bool) -> Result<TlsFiles, TestkitError> {
    make_ca(dir, "ca")?;
    // etcd's own gRPC gateway connects to its client URL with the server certificate, which
    // with client-certificate auth must therefore serve as a client certificate too (else
    // every member logs "incompatible key usage" and its HTTP/JSON gateway fails).
    make_cert(dir, "ca", "server", "serverAuth,clientAuth")?;
    make_cert(dir, "ca", "client", "clientAuth")?;
    Ok(TlsFiles {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
        client_cert_auth,
    })
}
