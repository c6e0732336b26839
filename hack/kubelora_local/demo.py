"""`make demo`: the whole product once, on the local cluster, a tiny model and the CPU.

    python -m kubelora_local.demo          # run it
    python -m kubelora_local.demo --down   # stop the operator and the cluster

Steps: start the local cluster (the CRDs are applied before the controller-manager), start the
operator, put a tiny random-init model and a chat dataset on the `models`/`datasets` claims, apply
examples/cpu-quickstart/, follow the LoRAJob's progress until Succeeded, apply the AdapterDeployment
that serves its adapter, wait for Ready, ask the adapter a question through the OpenAI API, and print
`kubectl get lj,ad`. Nothing here is faked: every step goes through the API server, the operator,
the trainer and the CPU engine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.text import Text

from kubelora_local import cluster
from kubelora_local.demo_summary import fit, progress_line, summary
from kubelora_local.kube import Kube, KubeError
from kubelora_local.paths import default_state_dir, repo_root

NAMESPACE = "default"
EXAMPLES = repo_root() / "examples" / "cpu-quickstart"
GROUP_PATH = f"/apis/kubelora.io/v1alpha1/namespaces/{NAMESPACE}"
console = Console()


def bin_path(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def kubectl(kubeconfig: str, *args: str, check: bool = True) -> str:
    result = subprocess.run(
        [bin_path("kubectl"), f"--kubeconfig={kubeconfig}", *args], capture_output=True, text=True, check=False
    )
    if check and result.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def start_operator(state: Path, kubeconfig: str) -> subprocess.Popen[bytes]:
    log = (state / "operator.log").open("ab")
    env = {**os.environ, "KUBECONFIG": kubeconfig}
    proc = subprocess.Popen(
        [bin_path("kubelora-operator"), "--all-namespaces", "--liveness", ""],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    (state / "run" / "operator.pid").write_text(str(proc.pid))
    return proc


def stop_operator(state: Path) -> None:
    pid_file = state / "run" / "operator.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        pid_file.unlink()


def seed_volumes(state: Path) -> None:
    """The tiny base model and the dataset, where the runner mounts the claims."""
    import transformers

    from kubelora_local.tinymodel import build_tiny_model, write_chat_dataset

    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # a log is not a terminal

    claims = state / "pvcs" / NAMESPACE
    model_dir = claims / "models" / "tiny-llama"
    if not (model_dir / "config.json").exists():
        build_tiny_model(model_dir, initializer_range=0.3)
    write_chat_dataset(claims / "datasets" / "chat.jsonl", n=96)


def get(kube: Kube, plural: str, name: str) -> dict[str, Any]:
    try:
        return kube.request("GET", f"{GROUP_PATH}/{plural}/{name}")
    except KubeError as err:
        if err.status == 404:
            return {}
        raise


def wait_for_job(kube: Kube, name: str, timeout: float) -> dict[str, Any]:
    """Follow the LoRAJob: one line that updates in a terminal, a new line per change in a plain log."""
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    last = ""
    with Live(Text(""), console=console, refresh_per_second=2, transient=False) if console.is_terminal \
            else contextlib.nullcontext() as live:
        while time.monotonic() < deadline:
            job = get(kube, "lorajobs", name)
            line = progress_line(job)
            if line != last:
                if live is not None:
                    live.update(Text(line))
                else:
                    say(line)
                last = line
            if job.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                return job
            time.sleep(1)
    raise SystemExit(f"LoRAJob {name} did not finish in {timeout:.0f} s; see `kubectl describe lj {name}`")


def say(line: str) -> None:
    """A plain line: no markup, no highlighting, never wrapped (the summary lines are 80 columns already)."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def wait_for_deployment(kube: Kube, name: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        ad = get(kube, "adapterdeployments", name)
        status = ad.get("status", {})
        line = (
            f"AdapterDeployment {name}: {status.get('phase', 'Pending')}, adapters {status.get('adaptersReady', '-')}"
        )
        if line != last:
            say(line)
            last = line
        if status.get("phase") == "Ready":
            return ad
        if status.get("phase") == "Failed":
            raise SystemExit(f"AdapterDeployment failed: {json.dumps(status.get('conditions'), indent=1)}")
        time.sleep(1)
    raise SystemExit(f"AdapterDeployment {name} not Ready in {timeout:.0f} s; see `kubectl describe ad {name}`")


def ask(kube: Kube, deployment: str, model: str, question: str) -> str:
    """Send one chat completion to a ready serving pod (the local cluster has no kube-proxy)."""
    pods = kube.request(
        "GET",
        f"/api/v1/namespaces/{NAMESPACE}/pods",
        params={"labelSelector": f"kubelora.io/adapterdeployment={deployment}"},
    )["items"]
    ready = [
        p
        for p in pods
        if any(c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions", []))
    ]
    if not ready:
        raise SystemExit("no ready serving pod")
    url = f"http://{ready[0]['status']['podIP']}:8000/v1/chat/completions"
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 24, "temperature": 0}
    answer = httpx.post(url, json=body, timeout=60).raise_for_status().json()
    return str(answer["choices"][0]["message"]["content"])


def run(state: Path) -> None:
    started = time.monotonic()
    say(("== KubeLoRA demo " + "=" * 80)[:80])
    say("1. local cluster  2. operator  3. tiny model + dataset")
    say("4. LoRAJob  5. AdapterDeployment  6. chat")
    info = cluster.up(state)
    kube = info.client()
    say(f"cluster ready at {info.server}")
    say(f"  KUBECONFIG={info.kubeconfig}")
    stop_operator(state)
    start_operator(state, info.kubeconfig)
    say(f"operator started; log: {state / 'operator.log'}")
    seed_volumes(state)
    say("tiny model at pvc://models/tiny-llama, dataset at pvc://datasets/chat.jsonl")
    for manifest in ("storage.yaml", "lorajob.yaml"):
        say(kubectl(info.kubeconfig, "apply", "-n", NAMESPACE, "-f", str(EXAMPLES / manifest)).strip())
    job = wait_for_job(kube, "tiny-chat", timeout=900)
    if job["status"]["phase"] != "Succeeded":
        raise SystemExit(f"LoRAJob failed: {job['status'].get('message')}")
    for line in summary(job):
        say(line)
    say(kubectl(info.kubeconfig, "apply", "-n", NAMESPACE, "-f", str(EXAMPLES / "adapterdeployment.yaml")).strip())
    wait_for_deployment(kube, "tiny-chat", timeout=300)
    question = "What colour is the sky?"  # one of the dataset's facts
    say(f"user: {question}")
    say(fit(f"tiny-chat (adapter): {ask(kube, 'tiny-chat', 'tiny-chat', question)!r}"))
    say(fit(f"tiny-llama (base): {ask(kube, 'tiny-chat', 'tiny-llama', question)!r}"))
    for kind in ("lj", "ad"):  # one kind at a time: no kind/ prefix, so the table fits 80 columns
        for line in kubectl(info.kubeconfig, "get", kind, "-n", NAMESPACE).rstrip().splitlines():
            say(line.rstrip())
    say(f"demo finished in {time.monotonic() - started:.0f} s. Stop it with `make demo-down`; explore with")
    say(f"  export KUBECONFIG={info.kubeconfig}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kubelora-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--down", action="store_true", help="stop the demo's operator and cluster")
    parser.add_argument("--state-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    state = (args.state_dir or default_state_dir()).resolve()
    if args.down:
        stop_operator(state)
        console.print("stopped: " + (", ".join(cluster.down(state)) or "nothing was running"))
        return 0
    run(state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
