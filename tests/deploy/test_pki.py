"""Deployment inputs, checked by independent readers: the certificate chain and key formats with
``cryptography``, the node config and run config with Flower's and fedlora's own parsers."""

from __future__ import annotations

import ipaddress
import stat

import tomllib
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from flwr.common.config import parse_config_args

from deploy.launcher import Layout, node_config, run_config_file, superlink_command, supernode_command
from deploy.pki import make_pki
from fed.config import RunConfig
from fed.config.sources import flatten, from_run_config, resolve


def test_ca_signs_a_server_certificate_valid_for_the_address(tmp_path):
    pki = make_pki(tmp_path, ["127.0.0.1", "fl.example.org"], nodes=2)
    ca = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    ca.public_key().verify(
        server.signature, server.tbs_certificate_bytes, padding.PKCS1v15(), server.signature_hash_algorithm
    )
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert stat.S_IMODE(pki.server_key.stat().st_mode) == 0o600


def test_node_keys_are_openssh_p384_pairs_and_survive_a_second_run(tmp_path):
    pki = make_pki(tmp_path, ["localhost"], nodes=2)
    first = pki.node_public(1).read_bytes()
    make_pki(tmp_path, ["localhost"], nodes=2)
    assert pki.node_public(1).read_bytes() == first and pki.nodes() == [0, 1]
    private = serialization.load_ssh_private_key(pki.node_key(1).read_bytes(), password=None)
    public = serialization.load_ssh_public_key(first)
    assert isinstance(private.curve, ec.SECP384R1) and private.public_key().public_numbers() == public.public_numbers()
    assert stat.S_IMODE(pki.node_key(1).stat().st_mode) == 0o600


def test_node_config_parses_with_flowers_parser(tmp_path):
    text = node_config(3, str(tmp_path / "my data.csv"), tmp_path / "state", num_nodes=4)
    assert parse_config_args([text]) == {
        "partition-id": 3,
        "num-partitions": 4,
        "state-dir": str(tmp_path / "state"),
        "data-path": str(tmp_path / "my data.csv"),
    }


def test_run_config_file_reproduces_the_config(tmp_path):
    cfg = resolve("quickstart", ["data.labels=neg,pos", "adapter.targets=query,value", "federation.rounds=7"])
    path = run_config_file(cfg, tmp_path / "runs", "first", tmp_path / "rc.toml")
    flat = flatten(tomllib.loads(path.read_text()))
    assert flat["out"] == str((tmp_path / "runs").resolve()) and flat["name"] == "first" and flat["resume"] == ""
    assert from_run_config(flat) == cfg


def test_secure_commands_use_tls_and_node_auth_and_insecure_says_so(tmp_path):
    layout = Layout(tmp_path)
    link = superlink_command(layout, "127.0.0.1", 9093, insecure=False)
    assert "--enable-supernode-auth" in link and "--ssl-certfile" in link and "--insecure" not in link
    node = supernode_command(layout, 0, "127.0.0.1:9093", 9094, "partition-id=0", insecure=False)
    assert "--auth-supernode-private-key" in node and "--root-certificates" in node
    assert superlink_command(layout, "127.0.0.1", 9093, insecure=True)[-1] == "--insecure"


def test_policy_flags_reach_the_node_as_its_policy(tmp_path, monkeypatch):
    """``fed deploy supernode`` flags -> --node-config -> Flower's parser -> the policy the client reads."""
    import argparse

    from deploy.cli import add_commands, policy_config
    from fed.privacy.client import POLICY_ENV, node_policy
    from fed.privacy.policy import REPLY_DELAY, STRICT, Policy

    monkeypatch.delenv(POLICY_ENV, raising=False)
    (tmp_path / "policy.toml").write_text("max-epsilon = 3\nmin-eval-rows = 50\n")
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    argv = ["deploy", "supernode", "--node", "0", "--superlink", "x:1", "--data", "d.csv", "--delta", "1e-6"]
    args = parser.parse_args([*argv, "--policy", str(tmp_path / "policy.toml"), "--allow-evaluation"])
    node = parse_config_args([node_config(0, None, tmp_path, 1, policy_config(args))])
    dp = RunConfig().dp
    assert node_policy(node, dp) == Policy(
        dp_required=True,
        max_epsilon=3.0,
        delta=1e-6,
        min_noise_multiplier=STRICT.min_noise_multiplier,
        evaluate=True,
        min_eval_rows=50,
        reply_delay=REPLY_DELAY,  # DP replies on the default grid
    )
    explicit = parser.parse_args([*argv, "--reply-delay", "0"])  # the operator's explicit choice: no grid
    assert (
        node_policy(parse_config_args([node_config(0, None, tmp_path, 1, policy_config(explicit))]), dp).reply_delay
        == 0
    )
    bare = parse_config_args([node_config(0, None, tmp_path, 1, policy_config(parser.parse_args(argv[:-2])))])
    assert node_policy(bare, dp) == STRICT  # no flags: the strict default, DP required
    opted = parser.parse_args([*argv, "--dp-opt-out"])
    assert not node_policy(parse_config_args([node_config(0, None, tmp_path, 1, policy_config(opted))]), dp).dp_required
