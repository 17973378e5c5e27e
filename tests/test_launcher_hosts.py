from __future__ import annotations

import socket
from collections import Counter

import pytest

from launcher.job.hosts import Host, HostsError, parse_hosts, parse_hosts_text, place, slot_env

GOOD = """\
# the head node first
localhost slots=1

alice@node-1 slots=8   # eight GPUs
node-2                 # slots default to 1
10.0.0.7 slots=2
"""


def test_parse_good_hostfile(tmp_path):
    p = tmp_path / "hosts.txt"
    p.write_text(GOOD)
    hosts = parse_hosts(p)
    assert hosts == [Host("localhost", 1), Host("node-1", 8, "alice"), Host("node-2", 1), Host("10.0.0.7", 2)]
    assert hosts[1].ssh_target == "alice@node-1" and hosts[2].ssh_target == "node-2"
    assert [h.is_local for h in hosts] == [True, False, False, False]


def test_is_local():
    assert Host("127.0.0.2").is_local and Host("LOCALHOST").is_local
    assert Host(socket.gethostname()).is_local
    assert not Host("surely-not-this-machine-42").is_local


def test_a_generator_gets_the_device_of_its_slot(monkeypatch):
    node = Host("node-1", 4)
    assert [slot_env(node, k)["CUDA_VISIBLE_DEVICES"] for k in range(5)] == ["0", "1", "2", "3", "0"]
    assert slot_env(node, 1)["BOBA_SLOTS"] == "4"
    # a local host counts among the GPUs the launcher itself was given; a remote one ignores them
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert [slot_env(Host("localhost", 2), k)["CUDA_VISIBLE_DEVICES"] for k in range(2)] == ["3", "5"]
    assert slot_env(node, 1)["CUDA_VISIBLE_DEVICES"] == "1"


def test_ssh_config_is_checked_and_given_to_every_host(tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("localhost\nnode-1\n")
    with pytest.raises(HostsError, match="--ssh-config: no such file"):
        parse_hosts(hosts, str(tmp_path / "missing"))
    (tmp_path / "ssh_config").write_text("Host *\n")
    assert {h.ssh_config for h in parse_hosts(hosts, str(tmp_path / "ssh_config"))} == {str(tmp_path / "ssh_config")}


@pytest.mark.parametrize("line, message", [
    ("node-1 slots=0", "hosts.txt:2: bad slots value '0': expected an integer >= 1"),
    ("node-1 slots=two", "hosts.txt:2: bad slots value 'two': expected an integer >= 1"),
    ("node-1 slots=-3", "hosts.txt:2: bad slots value '-3'"),
    ("node-1 slots=", "hosts.txt:2: bad slots value ''"),
    ("node-1 cores=4", "hosts.txt:2: unknown key 'cores' (known: slots, gpus)"),
    ("node-1 gpus=-1", "hosts.txt:2: bad gpus value '-1': expected an integer >= 0"),
    ("node-1 slots=2 slots=3", "hosts.txt:2: slots given twice"),
    ("node-1 8", "hosts.txt:2: expected key=value after the host name, got '8'"),
    ("head", "hosts.txt:2: duplicate host 'head' (first listed at line 1)"),
    ("HEAD slots=2", "hosts.txt:2: duplicate host 'HEAD' (first listed at line 1)"),
    ("bad_host!", "hosts.txt:2: bad host name 'bad_host!'"),
    ("@node-3", "hosts.txt:2: bad user name '' in '@node-3'"),
    ("us er@node-3", "hosts.txt:2: expected key=value after the host name, got 'er@node-3'"),
])
def test_bad_lines_name_file_line_and_fault(line, message):
    with pytest.raises(HostsError) as e:
        parse_hosts_text(f"head slots=1\n{line}\n", "hosts.txt")
    assert str(e.value).startswith(message), str(e.value)


def test_empty_and_missing_hostfiles(tmp_path):
    with pytest.raises(HostsError, match=r"^h.txt: no hosts listed"):
        parse_hosts_text("# nothing\n\n", "h.txt")
    with pytest.raises(HostsError, match=r"missing\.txt: cannot read hostfile"):
        parse_hosts(tmp_path / "missing.txt")


COUNTS = {"sampler": 1, "generator": 6, "verifier": 2, "packer": 1, "learner": 1, "broadcaster": 1}


def test_place_spreads_generators_by_slots_and_keeps_control_on_head():
    hosts = [Host("head", 1), Host("a", 3), Host("b", 2)]
    placed = place(COUNTS, hosts, {})
    assert len(placed) == sum(COUNTS.values())
    assert [(r, i) for r, i, _ in placed][:3] == [("sampler", 0), ("generator", 0), ("generator", 1)]
    gens = Counter(h.name for r, _, h in placed if r == "generator")
    assert gens == {"head": 1, "a": 3, "b": 2}               # proportional to slots
    assert all(h.name == "head" for r, _, h in placed if r != "generator")
    # indices are 0..count-1 per role
    for role, n in COUNTS.items():
        assert sorted(i for r, i, _ in placed if r == role) == list(range(n))


def test_place_oversubscribes_in_proportion():
    placed = place({"generator": 9}, [Host("x", 1), Host("y", 2)], {})
    assert Counter(h.name for _, _, h in placed) == {"x": 3, "y": 6}


def test_place_pinned_roles_round_robin_over_their_hosts():
    hosts = [Host("head"), Host("a", 4), Host("b", 4)]
    placed = place({"generator": 3, "learner": 1, "verifier": 2}, hosts,
                   {"generator": ["b"], "learner": ["a"], "verifier": ["a", "b"], "sampler": None})
    by = {(r, i): h.name for r, i, h in placed}
    assert by == {("generator", 0): "b", ("generator", 1): "b", ("generator", 2): "b",
                  ("verifier", 0): "a", ("verifier", 1): "b", ("learner", 0): "a"}
    assert [h for r, _, h in placed if r == "learner"] == [Host("a", 4)]   # the hostfile's entry


def test_place_without_hostfile_is_all_local():
    placed = place(COUNTS, [], {})
    assert {h for _, _, h in placed} == {Host("localhost")}
    assert place(COUNTS, None, {"learner": ["localhost"]})[-2][2].is_local


def test_place_errors():
    hosts = [Host("head"), Host("a")]
    with pytest.raises(HostsError, match=r"actors\.learner\.hosts: unknown host 'zz' \(hostfile lists: head, a\)"):
        place({"learner": 1}, hosts, {"learner": ["zz"]})
    with pytest.raises(HostsError, match=r"actors\.packer\.hosts: pinned hosts for a role that is not placed"):
        place({"learner": 1}, hosts, {"packer": ["a"]})
    with pytest.raises(HostsError, match=r"actors\.generator\.count: expected an integer >= 0, got -1"):
        place({"generator": -1}, hosts, {})
