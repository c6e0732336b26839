"""The real agent (``kubelora-agent --desired-file``) against the real CPU engine, both as processes.

One bad adapter of each kind fails with its own reason while the good ones serve; an engine killed with
SIGKILL and started again gets its whole set back; changes to the desired set (removal, new digest) are
applied without touching the other adapters.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubelora.api.digest import digest_of, file_sha256
from kubelora.api.runtime import MANIFEST_FILE, DesiredAdapter, DesiredAdapters
from kubelora_server.testing import Process, free_port, make_adapter
from tests.integration.test_cpu_engine import PROMPT, tiny_assets

pytestmark = pytest.mark.integration


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Stack:
    def __init__(self, root: Path) -> None:
        assets = tiny_assets()
        self.root = root
        self.base = assets.base
        self.engine_port, self.agent_port = free_port(), free_port()
        self.engine_url = f"http://127.0.0.1:{self.engine_port}"
        self.agent_url = f"http://127.0.0.1:{self.agent_port}"
        self.cache = root / "cache"
        self.desired_file = root / "adapters.json"
        src = root / "src"
        shutil.copytree(assets.a1, src / "live")
        shutil.copytree(assets.a1, src / "corrupt")
        data = bytearray((src / "corrupt" / "adapter_model.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (src / "corrupt" / "adapter_model.safetensors").write_bytes(bytes(data))
        # Adapters without a KubeLoRA manifest: one exactly as peft's save_pretrained writes it (its own
        # README.md, base_model_name_or_path as peft recorded it), one a copy of good2 minus the manifest.
        peft_save_pretrained(self.base, src / "handmade", seed=5)
        shutil.copytree(assets.a2, src / "nomanifest")
        (src / "nomanifest" / MANIFEST_FILE).unlink()
        (src / "notanadapter").mkdir()
        (src / "notanadapter" / "README.md").write_text("weights elsewhere\n")
        make_adapter(self.base, src / "otherbase", seed=4, base_model="pvc://models/some-other-model")
        self.src = src
        self.sources = {
            "good1": assets.a1,
            "good2": assets.a2,
            "live": src / "live",
            "corrupt": src / "corrupt",
            "handmade": src / "handmade",
            "nomanifest": src / "nomanifest",
            "notanadapter": src / "notanadapter",
            "otherbase": src / "otherbase",
            "big": assets.big,
        }
        self.write_desired(list(self.sources))
        self.engine: Process | None = None
        self.agent = Process.module(
            "kubelora_server.agent",
            [
                "--desired-file",
                str(self.desired_file),
                "--engine-url",
                self.engine_url,
                "--cache-dir",
                str(self.cache),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.agent_port),
                "--resync-interval",
                "0.5",
                "--file-poll-interval",
                "0.2",
                "--pod-name",
                "pod-0",
            ],
            root / "agent.log",
        )

    def write_desired(self, names: list[str], pins: dict[str, str] | None = None) -> None:
        pins = pins or {}
        desired = DesiredAdapters(
            base_model=f"file://{self.base}",
            served_name="tiny",
            max_lora_rank=16,
            max_loras=2,
            max_cpu_loras=8,
            adapters=[DesiredAdapter(name=n, uri=f"file://{self.sources[n]}", digest=pins.get(n)) for n in names],
        )
        tmp = self.desired_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(desired.wire()))
        tmp.replace(self.desired_file)

    def start_engine(self) -> None:
        self.engine = Process.module(
            "kubelora_server.engine",
            [
                "--model",
                f"file://{self.base}",
                "--served-model-name",
                "tiny",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.engine_port),
                "--enable-lora",
                "--max-loras",
                "2",
                "--max-cpu-loras",
                "8",
                "--max-lora-rank",
                "16",
                "--max-model-len",
                "128",
            ],
            self.root / "engine.log",
            env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
        ).start()
        self.engine.wait_healthy(self.engine_url + "/health")

    def report(self) -> dict[str, Any]:
        return dict(httpx.get(self.agent_url + "/adapters", timeout=5).json())

    def states(self) -> dict[str, tuple[str, str]]:
        return {a["name"]: (a["state"], a.get("reason", "")) for a in self.report()["adapters"]}

    def ready(self) -> bool:
        return httpx.get(self.agent_url + "/readyz", timeout=5).status_code == 200

    def engine_adapters(self) -> dict[str, str]:
        cards = httpx.get(self.engine_url + "/v1/models", timeout=5).json()["data"]
        return {c["id"]: c["root"] for c in cards if c["parent"]}

    def chat(self, model: str) -> str:
        resp = httpx.post(
            self.engine_url + "/v1/chat/completions",
            timeout=30,
            json={"model": model, "messages": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True},
        )
        assert resp.status_code == 200, resp.text
        return str(resp.json()["choices"][0]["message"]["content"])

    def logs(self) -> str:
        return f"--- agent\n{self.agent.log_tail(60)}\n--- engine\n{self.engine.log_tail(30) if self.engine else ''}"


def peft_save_pretrained(base: Path, dest: Path, seed: int) -> None:
    """A LoRA adapter as anyone makes one with peft, untouched: no KubeLoRA code writes into the folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(3.0)
    model.save_pretrained(str(dest))


GOOD = {"good1", "good2", "live", "handmade", "nomanifest"}
FAILED = {
    "corrupt": "DigestMismatch",
    "notanadapter": "ManifestInvalid",
    "otherbase": "BaseModelMismatch",
    "big": "RankTooLarge",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("agent-e2e"))
    s.agent.start()
    try:
        s.agent.wait_healthy(s.agent_url + "/healthz", timeout=60)
        yield s
    finally:
        s.agent.stop()
        if s.engine is not None:
            s.engine.stop()


def test_bad_adapters_fail_with_their_reason_and_good_ones_load(stack: Stack) -> None:
    wait_for(
        "fetches before the engine exists",
        lambda: (
            all(st == ("Pending", "") or st[0] == "Failed" for st in stack.states().values())
            and len(stack.states()) == 9
        ),
    )
    assert not stack.ready(), "no engine yet"
    assert stack.report()["engineReady"] is False
    stack.start_engine()
    try:
        wait_for("readiness", stack.ready)
    except AssertionError:
        raise AssertionError(stack.logs()) from None
    states = stack.states()
    assert {n: s for n, s in states.items() if n in GOOD} == {n: ("Loaded", "") for n in GOOD}
    assert {n: s[1] for n, s in states.items() if s[0] == "Failed"} == FAILED
    report = {a["name"]: a for a in stack.report()["adapters"]}
    assert "adapter_model.safetensors" in report["corrupt"]["message"]
    assert "some-other-model" in report["otherbase"]["message"]
    loaded = stack.engine_adapters()
    assert set(loaded) == GOOD
    assert all(Path(root).parent == stack.cache for root in loaded.values())
    assert all(report[n]["digest"] and Path(loaded[n]).name.endswith(report[n]["digest"][7:19]) for n in GOOD)
    outs = {n: stack.chat(n) for n in ("tiny", "good1", "good2", "handmade")}
    assert len(set(outs.values())) == 4
    # Manifest-less adapters: served by URI, the status carries the digest the agent computed over the files
    # it copied, and the same weights answer exactly as they do with a manifest.
    handmade = stack.sources["handmade"]
    files = sorted(p.name for p in handmade.iterdir())
    assert "README.md" in files and MANIFEST_FILE not in files
    assert report["handmade"]["digest"] == digest_of({f: file_sha256(handmade / f) for f in files})
    assert stack.chat("nomanifest") == outs["good2"]
    assert report["nomanifest"]["digest"] == report["good2"]["digest"]  # one algorithm: same files, same digest
    metrics = httpx.get(stack.agent_url + "/metrics").text
    assert 'kubelora_agent_adapters{state="Loaded"} 5.0' in metrics
    assert 'kubelora_agent_adapters{state="Failed"} 4.0' in metrics


def test_engine_restart_gets_the_whole_set_back(stack: Stack) -> None:
    assert stack.engine is not None
    before = {n: stack.chat(n) for n in ("good1", "good2")}
    stack.engine.kill()
    wait_for("the agent to notice", lambda: not stack.ready() and stack.report()["engineReady"] is False)
    assert {stack.states()[n][0] for n in GOOD} == {"Pending"}
    stack.start_engine()
    try:
        wait_for("restored adapters", lambda: stack.ready() and set(stack.engine_adapters()) == GOOD)
    except AssertionError:
        raise AssertionError(stack.logs()) from None
    assert {n: stack.chat(n) for n in ("good1", "good2")} == before
    metrics = httpx.get(stack.agent_url + "/metrics").text
    assert "kubelora_agent_engine_recoveries_total 1.0" in metrics


def test_desired_set_changes_are_applied_in_place(stack: Stack) -> None:
    old_root = stack.engine_adapters()["live"]
    good1_root = stack.engine_adapters()["good1"]
    live = stack.src / "live"
    shutil.rmtree(live)
    make_adapter(stack.base, live, rank=8, seed=9, scale=3.0)
    new_digest = json.loads((live / MANIFEST_FILE).read_text())["digest"]
    old_text = stack.chat("live")
    stack.write_desired(["good1", "live"], pins={"live": new_digest})
    try:
        wait_for(
            "reload and removal",
            lambda: (
                stack.engine_adapters().get("live", old_root) != old_root
                and "good2" not in stack.engine_adapters()
                and stack.ready()
            ),
        )
    except AssertionError:
        raise AssertionError(stack.logs()) from None
    assert stack.engine_adapters()["good1"] == good1_root, "untouched adapters are not reloaded"
    assert stack.engine_adapters()["live"].endswith(new_digest[7:19])
    assert stack.chat("live") != old_text
    assert [a["name"] for a in stack.report()["adapters"]] == ["good1", "live"]
    wait_for(
        "cache garbage collection",
        lambda: (
            sorted(p.name for p in stack.cache.iterdir())
            == sorted(Path(r).name for r in stack.engine_adapters().values())
        ),
    )


def test_a_refused_new_version_leaves_the_old_one_answering(stack: Stack) -> None:
    """The engine refuses the new weights (not a safetensors file, but signed, so the agent's checks pass):
    the old version keeps answering under the name through the whole attempt, and the status says why."""
    from kubelora_server.testing import write_manifest

    root = stack.engine_adapters()["live"]
    before = stack.chat("live")
    live = stack.src / "live"
    (live / "adapter_model.safetensors").write_bytes(b"these are not safetensors " * 64)
    digest = write_manifest(live, str(stack.base)).digest
    stack.write_desired(["good1", "live"], pins={"live": digest})
    answers: list[str] = []

    def refused() -> bool:
        answers.append(stack.chat("live"))
        state, reason = stack.states()["live"]
        return reason == "LoadFailed" and state == "Failed"

    try:
        wait_for("the refusal", refused, timeout=90)
    except AssertionError:
        raise AssertionError(stack.logs()) from None
    assert set(answers) == {before}, "every request during the attempt got the old version"
    assert stack.engine_adapters()["live"] == root
    assert not [n for n in stack.engine_adapters() if "~" in n], "the probe name is gone"
    report = {a["name"]: a for a in stack.report()["adapters"]}["live"]
    assert "refused" in report["message"] and "still serving the previous version" in report["message"]
    assert stack.ready()
