"""Run the host's unmodified ComfyUI server in a subprocess and talk to it over HTTP (stdlib only).

    from comfy_server import ComfyServer
    with ComfyServer(checkpoints_dir=ckpts, custom_nodes_dirs=[support]) as srv:
        entry = srv.wait(srv.queue(api_prompt), timeout=120)
        pngs = srv.outputs_images(entry)

Everything the server writes (output, input, temp, user settings, database, log) goes to one
work folder, a temp one unless given, so the host's ComfyUI tree is never touched.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterable

PACK_DIR = Path(__file__).resolve().parents[1]
DEFAULT_COMFYUI = PACK_DIR / ".host" / "ComfyUI"
DEFAULT_PYTHON = PACK_DIR / ".host" / "venv" / "bin" / "python"


class ComfyServerError(RuntimeError):
    """The server failed to start, rejected a prompt, or a prompt failed while executing."""


def free_port() -> int:
    """A TCP port that was free a moment ago (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Child-side (Linux): get SIGTERM if the parent dies, so a killed test run leaves no server."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class ComfyServer:
    """A stock ComfyUI `main.py` on 127.0.0.1:<free port>, CPU only, API nodes off."""

    def __init__(self, checkpoints_dir: str | os.PathLike | None = None,
                 custom_nodes_dirs: Iterable[str | os.PathLike] = (),
                 workdir: str | os.PathLike | None = None,
                 comfyui_dir: str | os.PathLike | None = None,
                 python: str | os.PathLike | None = None,
                 extra_args: Iterable[str] = (),
                 startup_timeout: float = 180.0,
                 front_end_root: str | os.PathLike | None = None,
                 loras_dir: str | os.PathLike | None = None) -> None:
        self.comfyui_dir = Path(comfyui_dir or DEFAULT_COMFYUI).resolve()
        self.python = str(python or DEFAULT_PYTHON)
        self.checkpoints_dir = Path(checkpoints_dir).resolve() if checkpoints_dir else None
        self.loras_dir = Path(loras_dir).resolve() if loras_dir else None
        self.custom_nodes_dirs = [Path(d).resolve() for d in custom_nodes_dirs]
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        # another frontend's static folder (e.g. a newer comfyui-frontend-package); None: ComfyUI's own
        self.front_end_root = Path(front_end_root).resolve() if front_end_root else None
        self._own_workdir = workdir is None
        self.workdir = Path(workdir).resolve() if workdir else None
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex

    # ---- paths -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_dir(self) -> Path:
        return self.workdir / "output"

    @property
    def input_dir(self) -> Path:
        return self.workdir / "input"

    @property
    def temp_dir(self) -> Path:
        return self.workdir / "temp"  # ComfyUI appends "temp" to --temp-directory itself

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "ComfyServer":
        """Start the server and wait until /object_info answers; raises ComfyServerError with the log tail."""
        if not (self.comfyui_dir / "main.py").is_file() or not os.path.exists(self.python):
            raise ComfyServerError(f"no ComfyUI host at {self.comfyui_dir} / {self.python}: run scripts/setup_host.sh")
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="comfy_server_"))
        for d in ("output", "input", "user/default"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        settings = self.workdir / "user" / "default" / "comfy.settings.json"
        if not settings.exists():  # opens the frontend on the canvas instead of the templates dialog
            settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
        self.port = free_port()
        cmd = [self.python, "main.py", "--cpu", "--disable-api-nodes", "--listen", "127.0.0.1",
               "--port", str(self.port),
               "--output-directory", str(self.output_dir), "--input-directory", str(self.input_dir),
               "--temp-directory", str(self.workdir), "--user-directory", str(self.workdir / "user"),
               # default database lives inside the ComfyUI tree; keep it per server
               "--database-url", f"sqlite:///{self.workdir / 'comfyui.db'}"]
        paths = self._write_extra_paths()
        if paths:
            cmd += ["--extra-model-paths-config", str(paths)]
        if self.front_end_root:
            cmd += ["--front-end-root", str(self.front_end_root)]
        cmd += self.extra_args
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(cmd, cwd=self.comfyui_dir, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        finally:
            log.close()  # the child holds its own descriptor
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _write_extra_paths(self) -> Path | None:
        """extra_model_paths yaml (written as JSON, a YAML subset); values are newline-separated lists."""
        conf: dict[str, str] = {}
        if self.checkpoints_dir:
            conf["checkpoints"] = str(self.checkpoints_dir)
        if self.loras_dir:
            conf["loras"] = str(self.loras_dir)
        if self.custom_nodes_dirs:  # folder_paths knows "custom_nodes", so the loader appends these
            conf["custom_nodes"] = "\n".join(str(d) for d in self.custom_nodes_dirs)
        if not conf:
            return None
        path = self.workdir / "extra_model_paths.yaml"
        path.write_text(json.dumps({"rcca_test": conf}, indent=1))
        return path

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ComfyServerError(f"ComfyUI exited with code {self.proc.returncode} during startup\n"
                                       + self.log_tail())
            try:
                status, _ = self.get("/object_info", timeout=30)
                if status == 200:
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(0.25)
        raise ComfyServerError(f"ComfyUI did not answer /object_info within {self.startup_timeout:.0f}s\n"
                               + self.log_tail())

    def stop(self) -> None:
        """Terminate the server (kill after 15 s); removes the work folder if it was a temp one."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log_tail(self, lines: int = 60) -> str:
        """Last `lines` lines of the server's stdout+stderr."""
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, TypeError):
            return "(no server log)"
        return "--- ComfyUI log tail ---\n" + "\n".join(text.splitlines()[-lines:])

    # ---- HTTP --------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30) -> tuple[int, bytes]:
        """GET `path`; returns (status, body) for any HTTP status, raises OSError if unreachable."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get_json(self, path: str, timeout: float = 30) -> Any:
        """GET `path` and decode JSON; raises ComfyServerError on a non-200 status."""
        status, body = self.get(path, timeout)
        if status != 200:
            raise ComfyServerError(f"GET {path} -> HTTP {status}: {body[:2000]!r}")
        return json.loads(body)

    def post_json(self, path: str, payload: Any, timeout: float = 30) -> tuple[int, Any]:
        """POST JSON to `path`; returns (status, decoded JSON or text)."""
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, body = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode(errors="replace")

    # ---- prompts -----------------------------------------------------------------------------
    def queue(self, prompt: dict) -> str:
        """POST /prompt with an API-format prompt; returns its prompt_id. A rejected prompt (HTTP 400,
        validation errors) raises ComfyServerError with the server's JSON error."""
        status, body = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200 or not isinstance(body, dict) or "prompt_id" not in body:
            text = json.dumps(body, indent=1) if isinstance(body, (dict, list)) else str(body)
            raise ComfyServerError(f"POST /prompt -> HTTP {status}:\n{text}")
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """Poll /history/<id> until the prompt finished; returns its history entry (outputs, status).
        Raises ComfyServerError with the status messages if it failed, TimeoutError with the log tail."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while time.monotonic() < deadline:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            status = (entry or {}).get("status") or {}
            if status.get("completed") or status.get("status_str") == "error":
                if status.get("status_str") != "success":
                    raise ComfyServerError(f"prompt {prompt_id} failed:\n" + _describe_failure(status))
                return entry
            if self.proc is None or self.proc.poll() is not None:
                raise ComfyServerError("ComfyUI is not running\n" + self.log_tail())
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        raise TimeoutError(f"prompt {prompt_id} not done after {timeout:.0f}s\n" + self.log_tail())

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """queue() + wait()."""
        return self.wait(self.queue(prompt), timeout)

    def outputs_images(self, entry: dict) -> list[Path]:
        """Files of every image a history entry lists (SaveImage: output/, PreviewImage: temp/)."""
        roots = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        files = []
        for node_out in entry.get("outputs", {}).values():
            for img in node_out.get("images", []):
                root = roots.get(img.get("type", "output"), self.output_dir)
                files.append(root / img.get("subfolder", "") / img["filename"])
        return files


def _describe_failure(status: dict) -> str:
    """Readable summary of a failed history status: the execution error first, then all messages."""
    lines = []
    for event, data in status.get("messages") or []:
        if event in ("execution_error", "execution_interrupted"):
            lines.append(f"{event} in node {data.get('node_id')} ({data.get('node_type')}): "
                         f"{data.get('exception_type', '')}: {data.get('exception_message', '')}".rstrip())
            lines.append("".join(data.get("traceback") or []))
    return "\n".join(lines + ["messages: " + json.dumps(status.get("messages"), indent=1)])


def txt2img_prompt(ckpt_name: str, *, size: int = 256, seed: int = 42, steps: int = 4,
                   text: str = "a cat", prefix: str = "txt2img") -> dict:
    """API-format txt2img prompt using only ComfyUI's built-in nodes; node "7" saves the image."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": steps, "cfg": 1.5, "sampler_name": "lcm",
            "scheduler": "simple", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def dit_txt2img_prompt(ckpt_name: str, family: str, *, width: int = 64, height: int = 64, seed: int = 42,
                       steps: int = 2, text: str = "a cat", prefix: str = "dit_txt2img") -> dict:
    """txt2img prompt for a Flux ("flux") or SD3 ("sd3") all-in-one checkpoint, built-in nodes only.

    Flux-dev is guidance-distilled: guidance goes in through FluxGuidance and cfg stays 1 (the
    negative is then never evaluated); SD3 uses real cfg with a negative. Node "7" saves the image.
    """
    prompt = txt2img_prompt(ckpt_name, seed=seed, steps=steps, text=text, prefix=prefix)
    prompt["4"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}}
    sampler = prompt["5"]["inputs"]
    sampler.update(sampler_name="euler", scheduler="simple")
    if family == "flux":
        prompt["8"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": 3.5}}
        sampler.update(cfg=1.0, positive=["8", 0])
    elif family == "sd3":
        sampler.update(cfg=2.0)
    else:
        raise ValueError(f"family must be 'flux' or 'sd3', not {family!r}")
    return prompt


if __name__ == "__main__":  # smoke: start, print node count, stop
    with ComfyServer() as s:
        print(f"{s.url}: {len(s.get_json('/object_info'))} node types", file=sys.stderr)
