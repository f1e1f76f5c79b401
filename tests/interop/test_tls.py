"""NBD over TLS (STARTTLS, x509) with real clients: a client with a certificate from our CA is
served; plaintext is refused in `require` mode; a client whose certificate comes from another
CA is refused."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockvirt.testing import BlockvirtServer

from .conftest import need, run

pytestmark = pytest.mark.interop


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", "ca-key.pem", "-out", "ca-cert.pem", cwd=d)  # fmt: skip


def _issue(ca: Path, out: Path, kind: str, cn: str) -> None:
    """Sign a server or client certificate with the CA in `ca`, write it into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    ext = out / f"{kind}.ext"
    if kind == "server":
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    else:
        ext.write_text("extendedKeyUsage=clientAuth\n")
    key, csr, cert = out / f"{kind}-key.pem", out / f"{kind}.csr", out / f"{kind}-cert.pem"
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", key, "-out", csr, cwd=out
    )
    signer = ("-CA", ca / "ca-cert.pem", "-CAkey", ca / "ca-key.pem", "-CAcreateserial")
    _openssl("x509", "-req", "-in", csr, *signer, "-days", "2", "-extfile", ext, "-out", cert, cwd=out)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need("openssl")
    root = tmp_path_factory.mktemp("pki")
    _ca(root / "ca", "blockvirt test CA")
    _ca(root / "other-ca", "someone else's CA")
    # Server credentials, as qemu's tls-creds-x509 lays them out.
    server = root / "server"
    _issue(root / "ca", server, "server", "blockvirt")
    (server / "ca-cert.pem").write_bytes((root / "ca" / "ca-cert.pem").read_bytes())
    # A good client: trusts our CA, has a certificate from it.
    good = root / "good"
    _issue(root / "ca", good, "client", "alice")
    (good / "ca-cert.pem").write_bytes((root / "ca" / "ca-cert.pem").read_bytes())
    # A stranger: trusts our CA (so it could verify us) but its certificate is foreign.
    bad = root / "bad"
    _issue(root / "other-ca", bad, "client", "mallory")
    (bad / "ca-cert.pem").write_bytes((root / "ca" / "ca-cert.pem").read_bytes())
    return root


def _server(tmp_path: Path, pki: Path, mode: str) -> BlockvirtServer:
    return BlockvirtServer(tmp_path / "data", extra_args=("--tls-dir", str(pki / "server"), "--tls", mode))


@pytest.fixture
def tls_server(tmp_path: Path, pki: Path) -> Iterator[BlockvirtServer]:
    with _server(tmp_path, pki, "require") as server:
        server.create_volume("vol", "16M")
        yield server


def _nbds(server: BlockvirtServer, creds: Path) -> str:
    return f"nbds://{server.nbd_host}:{server.nbd_port}/vol?tls-certificates={creds}"


def test_good_client_is_served_over_tls(tls_server: BlockvirtServer, pki: Path, tmp_path: Path) -> None:
    need("nbdinfo", "nbdcopy", "qemu-io")
    out = run(["nbdinfo", _nbds(tls_server, pki / "good")]).stdout
    assert "with TLS" in out and "export-size: 16777216" in out
    src = tmp_path / "src.raw"
    src.write_bytes(bytes(range(256)) * 4096 * 16)
    run(["nbdcopy", str(src), _nbds(tls_server, pki / "good")])
    back = tmp_path / "back.raw"
    run(["nbdcopy", _nbds(tls_server, pki / "good"), str(back)])
    assert back.read_bytes() == src.read_bytes()
    # qemu with tls-creds-x509 (it reads ca-cert.pem, client-cert.pem, client-key.pem).
    opts = (
        f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={tls_server.nbd_port},"
        "export=vol,tls-creds=tls0"
    )
    r = run(
        ["qemu-io", "--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={pki / 'good'}",
         "--image-opts", opts, "-c", "write -P 0x5c 0 64k", "-c", "read -P 0x5c 0 64k"],
    )  # fmt: skip
    assert "read 65536/65536" in r.stdout


def test_plaintext_is_refused_in_require_mode(tls_server: BlockvirtServer) -> None:
    need("nbdinfo")
    r = run(["nbdinfo", tls_server.uri("vol")], check=False)
    assert r.returncode != 0
    # LIST is refused too: nothing about the exports leaks before TLS.
    r = run(["nbdinfo", "--list", f"nbd://{tls_server.nbd_host}:{tls_server.nbd_port}"], check=False)
    assert "vol" not in r.stdout


def test_client_with_a_foreign_certificate_is_refused(tls_server: BlockvirtServer, pki: Path) -> None:
    need("nbdinfo")
    r = run(["nbdinfo", _nbds(tls_server, pki / "bad")], check=False)
    assert r.returncode != 0
    # ... and the server carries on serving good clients.
    assert "with TLS" in run(["nbdinfo", _nbds(tls_server, pki / "good")]).stdout


def test_allow_mode_serves_both(tmp_path: Path, pki: Path) -> None:
    need("nbdinfo")
    with _server(tmp_path, pki, "allow") as server:
        server.create_volume("vol", "16M")
        assert "without TLS" in run(["nbdinfo", server.uri("vol")]).stdout
        assert "with TLS" in run(["nbdinfo", _nbds(server, pki / "good")]).stdout


def test_bad_tls_dir_is_a_clear_error(tmp_path: Path) -> None:
    server = BlockvirtServer(tmp_path / "data", extra_args=("--tls-dir", str(tmp_path / "nowhere")))
    with pytest.raises(RuntimeError, match=r"lacks ca-cert\.pem"):
        server.start()
