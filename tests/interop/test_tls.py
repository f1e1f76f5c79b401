"""NBD over TLS (STARTTLS, x509) with real clients: a client with a certificate from our CA is
served; plaintext is refused in `require` mode; a client whose certificate comes from another
CA is refused. Access rules by certificate CN and SAN, seen by nbdinfo, nbdcopy and qemu-io.

TLS-PSK is not tested: Python 3.11's ssl module cannot serve PSK (spec.md §1)."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockvirt.testing import BlockvirtServer

from .conftest import nbdsh_env, need, run

pytestmark = pytest.mark.interop


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", "ca-key.pem", "-out", "ca-cert.pem", cwd=d)  # fmt: skip


def _issue(ca: Path, out: Path, kind: str, cn: str, san: str = "") -> None:
    """Sign a server or client certificate with the CA in `ca`, write it into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    ext = out / f"{kind}.ext"
    if kind == "server":
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    else:
        ext.write_text("extendedKeyUsage=clientAuth\n" + (f"subjectAltName={san}\n" if san else ""))
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
    # Another good client, with subject alternative names.
    bob = root / "bob"
    _issue(root / "ca", bob, "client", "bob", san="DNS:bob.example,email:bob@example.org")
    (bob / "ca-cert.pem").write_bytes((root / "ca" / "ca-cert.pem").read_bytes())
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


def _nbds(server: BlockvirtServer, creds: Path, export: str = "vol") -> str:
    return f"nbds://{server.nbd_host}:{server.nbd_port}/{export}?tls-certificates={creds}"


def _qemu_io_tls(
    server: BlockvirtServer, creds: Path, export: str, *cmds: str, read_only: bool = False
) -> subprocess.CompletedProcess[str]:
    """qemu-io over TLS with tls-creds-x509 (it reads ca-cert.pem, client-cert.pem, client-key.pem)."""
    opts = (
        f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={server.nbd_port},"
        f"export={export},tls-creds=tls0"
    )
    argv = [
        "qemu-io",
        "--object",
        f"tls-creds-x509,id=tls0,endpoint=client,dir={creds}",
        "--image-opts",
        opts,
    ]
    if read_only:
        argv.insert(1, "-r")
    for c in cmds:
        argv += ["-c", c]
    return run(argv, check=False)


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


def test_client_with_a_foreign_certificate_is_refused(
    tls_server: BlockvirtServer, pki: Path, tmp_path: Path
) -> None:
    need("nbdinfo", "nbdcopy", "qemu-io")
    r = run(["nbdinfo", _nbds(tls_server, pki / "bad")], check=False)
    assert r.returncode != 0
    # qemu-io and nbdcopy with the foreign certificate fail too, and write nothing.
    r = _qemu_io_tls(tls_server, pki / "bad", "vol", "write -P 0x66 0 4k")
    assert r.returncode != 0 and "wrote" not in r.stdout
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x66" * 65536)
    assert run(["nbdcopy", str(src), _nbds(tls_server, pki / "bad")], check=False).returncode != 0
    # ... and the server carries on serving good clients, with nothing written.
    assert "with TLS" in run(["nbdinfo", _nbds(tls_server, pki / "good")]).stdout
    r = _qemu_io_tls(tls_server, pki / "good", "vol", "read -P 0 0 4k")
    assert r.returncode == 0 and "read 4096/4096" in r.stdout, r.stdout + r.stderr


def test_plaintext_qemu_and_nbdcopy_are_refused_in_require_mode(
    tls_server: BlockvirtServer, tmp_path: Path
) -> None:
    need("qemu-io", "nbdcopy")
    r = run(["qemu-io", "-f", "raw", "-c", "read 0 4k", tls_server.uri("vol")], check=False)
    assert r.returncode != 0 and "TLS" in (r.stdout + r.stderr), r.stdout + r.stderr
    assert run(["nbdcopy", tls_server.uri("vol"), str(tmp_path / "out.raw")], check=False).returncode != 0


# ---------------------------------------------------------------- access rules by certificate


def _cli_ok(server: BlockvirtServer, *args: str) -> None:
    r = server.cli(*args)
    assert r.returncode == 0, r.stderr


def test_cn_rule_admits_its_client_and_refuses_others(tls_server: BlockvirtServer, pki: Path) -> None:
    need("nbdinfo", "qemu-io")
    _cli_ok(tls_server, "volume", "acl", "add", "vol", "--cn", "alice")
    # alice: served over TLS, reads and writes.
    assert "with TLS" in run(["nbdinfo", _nbds(tls_server, pki / "good")]).stdout
    r = _qemu_io_tls(tls_server, pki / "good", "vol", "write -P 0x61 0 64k", "read -P 0x61 0 64k")
    assert r.returncode == 0 and "read 65536/65536" in r.stdout, r.stdout + r.stderr
    # bob has a valid certificate from our CA, but no rule names him: refused as if 'vol' did
    # not exist (spec 3.7). libnbd shows the server's message only in its debug output;
    # qemu prints it.
    r = run(["nbdinfo", _nbds(tls_server, pki / "bob")], check=False)
    assert r.returncode != 0
    assert "server replied with error to opt_go request" in r.stderr, r.stderr
    r = run(
        ["nbdinfo", _nbds(tls_server, pki / "bob")], check=False, env={**nbdsh_env(), "LIBNBD_DEBUG": "1"}
    )
    assert "server error message: no export named 'vol' for this client" in r.stderr, r.stderr
    r = _qemu_io_tls(tls_server, pki / "bob", "vol", "read 0 4k")
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "no export named 'vol' for this client" in out, out
    # nbdinfo --list: each client sees only what it may open.
    tls_server.create_volume("public", "1M")
    base = f"nbds://{tls_server.nbd_host}:{tls_server.nbd_port}"
    alice = run(["nbdinfo", "--list", "--json", f"{base}/?tls-certificates={pki / 'good'}"]).stdout
    bob = run(["nbdinfo", "--list", "--json", f"{base}/?tls-certificates={pki / 'bob'}"]).stdout
    assert {e["export-name"] for e in json.loads(alice)["exports"]} == {"vol", "public"}
    assert {e["export-name"] for e in json.loads(bob)["exports"]} == {"public"}
    # Denials are counted per volume.
    metrics = urllib.request.urlopen(tls_server.api_url + "/metrics", timeout=30).read().decode()
    assert re.search(r'^blockvirt_access_denied_total\{volume="vol"\} [1-9]', metrics, re.M), metrics


def test_san_rule_and_read_only_grant_seen_by_real_clients(
    tls_server: BlockvirtServer, pki: Path, tmp_path: Path
) -> None:
    need("nbdinfo", "qemu-io", "nbdcopy")
    _cli_ok(tls_server, "volume", "acl", "add", "vol", "--cn", "alice")
    _cli_ok(tls_server, "volume", "acl", "add", "vol", "--san", "DNS:BOB.example", "--read-only")
    r = _qemu_io_tls(tls_server, pki / "good", "vol", "write -P 0x42 0 64k")
    assert r.returncode == 0, r.stdout + r.stderr
    # bob matches by SAN, read-only: the export says so, reads work, writes fail.
    out = run(["nbdinfo", "--json", _nbds(tls_server, pki / "bob")]).stdout
    [export] = json.loads(out)["exports"]
    assert export["is_read_only"] is True and export["can_trim"] is False
    # qemu-io opens read-write by default: the server's READ_ONLY flag refuses that open.
    r = _qemu_io_tls(tls_server, pki / "bob", "vol", "write -P 0x99 0 4k")
    assert r.returncode != 0 and "wrote" not in r.stdout, r.stdout + r.stderr
    assert "Permission denied" in r.stdout + r.stderr, r.stdout + r.stderr
    # Opened read-only (-r) it reads, and its writes fail.
    r = _qemu_io_tls(
        tls_server, pki / "bob", "vol", "read -P 0x42 0 64k", "write -P 0x99 0 4k", read_only=True
    )
    assert "read 65536/65536" in r.stdout and "wrote" not in r.stdout, r.stdout + r.stderr
    assert "read-only" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x99" * 65536)
    assert run(["nbdcopy", str(src), _nbds(tls_server, pki / "bob")], check=False).returncode != 0
    back = tmp_path / "back.raw"
    run(["nbdcopy", _nbds(tls_server, pki / "bob"), str(back)])
    assert back.read_bytes()[:65536] == b"\x42" * 65536
    # An email SAN names bob just as well (bare value: any SAN type).
    _cli_ok(tls_server, "volume", "acl", "clear", "vol")
    _cli_ok(tls_server, "volume", "acl", "add", "vol", "--san", "bob@example.org")
    assert "with TLS" in run(["nbdinfo", _nbds(tls_server, pki / "bob")]).stdout
    assert run(["nbdinfo", _nbds(tls_server, pki / "good")], check=False).returncode != 0


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
