//! Throwaway certificates for TLS tests, made with the `openssl` command: a CA, and server
//! certificates it signs for `127.0.0.1` and `localhost` (the addresses the test servers listen
//! on). Everything lives in a temporary directory removed on drop. No silent skip: without
//! `openssl` the tests that need it fail and say how to install it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// A certificate authority of its own.
#[derive(Debug)]
pub struct TestCa {
    dir: tempfile::TempDir,
    /// The CA's certificate (PEM): what a client trusts.
    pub cert: PathBuf,
    key: PathBuf,
}

/// A server's certificate (signed by a [`TestCa`]) and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// A new CA (EC P-256, valid two days), named `name`.
    pub fn new(name: &str) -> TestCa {
        let dir = tempfile::Builder::new()
            .prefix("seqcast-tls-")
            .tempdir()
            .unwrap_or_else(|err| panic!("cannot create a directory for certificates: {err}"));
        let cert = dir.path().join("ca.pem");
        let key = dir.path().join("ca.key");
        openssl(
            dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
            ],
            &[&format!("/CN={name}")],
            &[("-keyout", &key), ("-out", &cert)],
        );
        TestCa { dir, cert, key }
    }

    /// A server certificate for `127.0.0.1` and `localhost`, signed by this CA.
    pub fn issue_server(&self) -> ServerCert {
        let dir = self.dir.path();
        let key = dir.join("server.key");
        let csr = dir.join("server.csr");
        let cert = dir.join("server.pem");
        let ext = dir.join("server.ext");
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap_or_else(|err| panic!("cannot write {}: {err}", ext.display()));
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                "/CN=localhost",
            ],
            &[],
            &[("-keyout", &key), ("-out", &csr)],
        );
        openssl(
            dir,
            &["x509", "-req", "-days", "2", "-CAcreateserial"],
            &[],
            &[
                ("-in", &csr),
                ("-CA", &self.cert),
                ("-CAkey", &self.key),
                ("-extfile", &ext),
                ("-out", &cert),
            ],
        );
        ServerCert { cert, key }
    }
}

/// Runs `openssl ARGS EXTRA FILE-ARGS` in `dir`; panics with its output when it fails.
fn openssl(dir: &Path, args: &[&str], extra: &[&str], files: &[(&str, &Path)]) {
    let mut command = Command::new("openssl");
    command.args(args).args(extra).current_dir(dir);
    for (flag, path) in files {
        command.arg(flag).arg(path);
    }
    let output = command.output().unwrap_or_else(|err| {
        panic!(
            "these tests need the `openssl` command ({err}); install it (`apt-get install -y \
             openssl`)"
        )
    });
    assert!(
        output.status.success(),
        "openssl {args:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}
