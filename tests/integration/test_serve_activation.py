"""The README's registration example against a running server: the two commands it shows, run
as written, make ``cardio-helper`` routable; a clear cardiology query reaches it within 10 s, and
no request sent meanwhile gets a 404 or a 5xx (the catalog generation race)."""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests._fixtures.experts import write_lora_expert
from tests._fixtures.serve import free_port, home_with_lora_experts, start_server, stop_server, wait_until_healthy

REPO_ROOT = Path(__file__).resolve().parents[2]
ROUTABLE_WITHIN_S = 10.0

CARDIOLOGY_QUERIES = [
    "What are the warning signs of a heart attack?",
    "How is atrial fibrillation treated?",
    "What does an ECG show after a myocardial infarction?",
    "What is the difference between systolic and diastolic heart failure?",
    "When is a coronary artery bypass graft needed instead of a stent?",
    "What causes an irregular heartbeat or palpitations?",
    "How do beta blockers protect the heart after a heart attack?",
    "What is an ejection fraction and what is a normal value?",
    "What are the symptoms of aortic valve stenosis?",
    "How does a pacemaker regulate the heart rhythm?",
    "What is angina and how is it different from a heart attack?",
    "Which blood tests show damage to the heart muscle, such as troponin?",
    "What is cardiomyopathy and what causes the heart muscle to weaken?",
    "How is coronary artery disease diagnosed with a stress test?",
    "What does a heart murmur mean in an adult?",
    "How is endocarditis of the heart valves treated?",
    "What are the risks of a cardiac catheterization?",
    "Why does heart failure cause swelling in the legs?",
    "What is ventricular tachycardia and why is it dangerous?",
    "How does an echocardiogram check the heart valves?",
    "What lifestyle changes lower the risk of coronary heart disease?",
    "What is pericarditis and how does its chest pain feel?",
    "When should a patient with chest pain and an abnormal heart rhythm see a cardiologist?",
    "What is a cardiac arrest and how does it differ from a heart attack?",
]
"""The manifest's ``example_queries`` (the README leaves them as ``[...]``)."""

CLEAR_CARDIOLOGY = "My cardiologist says I have atrial fibrillation; how is an irregular heartbeat treated?"
OTHERS = ["What are the symptoms of type 2 diabetes?", "If 3x + 5 = 20, what is the value of x?"]
MEDICINE = [
    "What are the symptoms of type 2 diabetes?",
    "How is a broken arm treated in the emergency room?",
    "What vaccines protect children against measles?",
    "What are the side effects of ibuprofen?",
    "How is a urinary tract infection diagnosed?",
]


def readme_registration() -> tuple[dict, list[str]]:
    """The manifest (YAML) and the commands (bash) of the README's "Registering an expert"."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("### Registering an expert", 1)[1].split("\n## ", 1)[0]
    manifest_text = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    commands_text = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [line.split("#", 1)[0].strip() for line in commands_text.splitlines()]
    return yaml.safe_load(manifest_text.replace("[...]", "[]")), [c for c in commands if c]


@pytest.fixture(scope="module")
def readme_server(trained_router_home, base_models, tmp_path_factory):
    """A server of its own (this test changes its router): the session's small router, which
    knows medicine but not cardiology, and a medicine and a math expert."""
    home = home_with_lora_experts(
        trained_router_home.root, tmp_path_factory, "readme", [("med-expert", "medicine"), ("math-expert", "math")]
    )
    port, log = free_port(), tmp_path_factory.mktemp("readme-log") / "serve.log"
    ray_dir = Path(tempfile.mkdtemp(prefix="mose-ray-"))
    proc = start_server(home, port, log, extra_env={"RAY_TMPDIR": str(ray_dir)})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc, log)
        yield url, home, log
    finally:
        code = stop_server(proc)
        shutil.rmtree(ray_dir, ignore_errors=True)
        assert code == 0, f"mose serve did not shut down cleanly ({code}):\n{log.read_text()[-3000:]}"


def _cardio_folder(workdir: Path, manifest: dict) -> None:
    """``./cardio``: the README's manifest with real adapter files and their digests."""
    source = write_lora_expert(workdir / "adapter", "cardio-helper", seed=42, domain="cardiology").parent
    folder = workdir / "cardio"
    folder.mkdir()
    files = {}
    for relpath in manifest["files"]:
        shutil.copy(source / relpath, folder / relpath)
        files[relpath] = yaml.safe_load((source / "manifest.yaml").read_text())["files"][relpath]
    (folder / "manifest.yaml").write_text(
        yaml.safe_dump({**manifest, "files": files, "example_queries": CARDIOLOGY_QUERIES}, sort_keys=False)
    )


class Traffic:
    """Requests sent without pause from several threads (``model: auto``, some streamed) while
    the expert is registered and activated; every answer's status is kept."""

    def __init__(self, url: str, queries: list[str], threads: int = 3) -> None:
        self.url, self.queries, self.stop, self.outcomes = url, queries, threading.Event(), []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, index: int) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            n = 0
            while not self.stop.is_set():
                query = self.queries[(index + n) % len(self.queries)]
                stream = n % 2 == 1
                body = {
                    "model": "auto",
                    "messages": [{"role": "user", "content": query}],
                    "max_tokens": 2,
                    "temperature": 0,
                    "stream": stream,
                }
                response = client.post("/v1/chat/completions", json=body)
                problem = None
                if stream and response.status_code == 200 and '"error"' in response.text:
                    problem = response.text[-500:]  # an error after the stream started is reported in-band
                self.outcomes.append(
                    (
                        time.monotonic(),
                        response.status_code,
                        response.headers.get("x-mose-expert"),
                        problem or (response.text[-300:] if response.status_code != 200 else None),
                    )
                )
                n += 1

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=180)


def test_readme_registration_is_routable_within_10_s_and_nothing_fails_meanwhile(readme_server, tmp_path):
    url, home, log = readme_server
    manifest, commands = readme_registration()
    assert manifest["name"] == "cardio-helper" and manifest["domains"] == ["cardiology"]
    assert [c.split()[:3] for c in commands] == [
        [".venv/bin/mose", "expert", "add"],
        [".venv/bin/mose", "expert", "activate"],
    ]
    _cardio_folder(tmp_path, manifest)
    (tmp_path / ".venv").symlink_to(REPO_ROOT / ".venv")  # the commands run as written, from a checkout's root
    env = {**os.environ, "MOSE_HOME": str(home)}

    with httpx.Client(base_url=url, timeout=120) as client:
        before = client.post(
            "/v1/chat/completions",
            json={"model": "auto", "messages": [{"role": "user", "content": CLEAR_CARDIOLOGY}], "max_tokens": 2},
        )
        assert before.status_code == 200 and before.json()["mose"]["expert"] != "cardio-helper", before.text

    with Traffic(url, [CLEAR_CARDIOLOGY, *OTHERS]) as traffic:
        time.sleep(1.0)
        started = time.monotonic()
        for command in commands:
            done = subprocess.run(
                command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
            )
            assert done.returncode == 0, f"{command}:\n{done.stdout}\n{done.stderr[-3000:]}"
        commands_done = time.monotonic()
        assert "router v0002 learned cardiology" in done.stdout, done.stdout
        routed_after = None
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.monotonic() - commands_done < ROUTABLE_WITHIN_S:
                reply = client.post(
                    "/v1/chat/completions",
                    json={
                        "model": "auto",
                        "messages": [{"role": "user", "content": CLEAR_CARDIOLOGY}],
                        "max_tokens": 2,
                    },
                )
                assert reply.status_code == 200, reply.text
                if reply.json()["mose"]["expert"] == "cardio-helper":
                    routed_after = time.monotonic() - commands_done
                    assert reply.json()["mose"]["domain"] == "cardiology"
                    break
                time.sleep(0.1)
            by_name = client.post(
                "/v1/chat/completions",
                json={
                    "model": "cardio-helper",
                    "messages": [{"role": "user", "content": "Is my heart healthy?"}],
                    "max_tokens": 2,
                },
            )
            assert by_name.status_code == 200, by_name.text
        time.sleep(1.0)

    assert routed_after is not None, (
        f"not routed to cardio-helper within {ROUTABLE_WITHIN_S} s of the commands "
        f"({commands_done - started:.1f} s):\n{log.read_text()[-3000:]}"
    )
    failed = [o for o in traffic.outcomes if o[1] != 200 or o[3] is not None]
    assert not failed, failed[:5]
    during = [o for o in traffic.outcomes if started <= o[0] <= commands_done + routed_after]
    assert len(during) >= 3, len(during)
    print(
        json.dumps(
            {
                "commands_s": round(commands_done - started, 1),
                "routed_after_s": round(routed_after, 2),
                "requests": len(traffic.outcomes),
                "to_cardio_helper": sum(o[2] == "cardio-helper" for o in traffic.outcomes),
            }
        )
    )


def test_new_experts_for_a_known_domain_take_over_without_a_404(readme_server, tmp_path):
    """The race at its narrowest: the router knows ``medicine`` already, so it picks a newly
    activated medicine expert as soon as its mapping moves, and the pool must have loaded it by
    then. Three activations in a row, each under traffic."""
    url, home, log = readme_server
    env = {**os.environ, "MOSE_HOME": str(home)}
    mose = str(REPO_ROOT / ".venv" / "bin" / "mose")
    with httpx.Client(base_url=url, timeout=120) as client:  # what the router sends to medicine's expert
        decisions = [client.post("/v1/route", json={"query": q}).json() for q in MEDICINE]
    medicine = [q for q, d in zip(MEDICINE, decisions) if d["expert"] == "med-expert"]
    assert medicine, decisions
    with Traffic(url, medicine, threads=4) as traffic:
        for seed, name in enumerate(["med-expert-2", "med-expert-3", "med-expert-4"]):
            manifest = write_lora_expert(tmp_path / name, name, seed=43 + seed, domain="medicine")
            for command in ([mose, "expert", "add", str(manifest)], [mose, "expert", "activate", name]):
                done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
                assert done.returncode == 0, done.stderr[-3000:]
            assert "already routes medicine" in done.stdout, done.stdout
            deadline = time.monotonic() + ROUTABLE_WITHIN_S
            while time.monotonic() < deadline and not any(o[2] == name for o in traffic.outcomes):
                time.sleep(0.1)
            assert any(o[2] == name for o in traffic.outcomes), (name, log.read_text()[-3000:])
        time.sleep(1.0)
    failed = [o for o in traffic.outcomes if o[1] != 200 or o[3] is not None]
    assert not failed, failed[:5]
    print(json.dumps(collections.Counter(o[2] for o in traffic.outcomes)))
