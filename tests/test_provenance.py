"""Provenance: the git state a run started from (commit, dirty flag, hashes of the diff and of
untracked source files, the diff itself) and the hash of dpq's source files that cache keys use."""

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

from conftest import compose_cfg

from dpq.core import provenance
from dpq.core.provenance import capture_git


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.email=t@example.org", "-c", "user.name=t", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def make_repo(root: Path, package: Path | None = None) -> Path:
    """A git repository holding ``src/dpq`` (a copy of ``package``, or one small file), committed."""
    root.mkdir(parents=True)
    git(root, "init", "-q")
    pkg = root / "src" / "dpq"
    if package is not None:
        shutil.copytree(package, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        pkg.mkdir(parents=True)
        (pkg / "a.py").write_text("x = 1\n")
    (root / ".gitignore").write_text("*.log\n")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "start")
    return pkg


def test_a_clean_tree_records_its_commit_and_no_diff(tmp_path):
    pkg = make_repo(tmp_path / "repo")
    state = capture_git(pkg)
    assert state.info["sha"] == git(tmp_path / "repo", "rev-parse", "HEAD").strip()
    assert state.info["dirty"] is False and state.patch == ""
    assert state.info["diff_sha256"] is None and state.info["untracked_sha256"] is None
    assert state.save(tmp_path / "prov") is None and not (tmp_path / "prov").exists()


def test_a_dirty_tree_records_the_hash_of_its_diff_and_of_untracked_source_files(tmp_path):
    repo = tmp_path / "repo"
    pkg = make_repo(repo)
    (pkg / "a.py").write_text("x = 2\n")
    state = capture_git(pkg)
    diff = git(repo, "diff", "HEAD", "--binary")
    assert state.info["dirty"] is True and "+x = 2" in diff
    assert state.info["diff_sha256"] == hashlib.sha256(diff.encode()).hexdigest()
    assert state.info["untracked"] == [] and state.patch == diff
    (pkg / "new_stage.py").write_text("y = 3\n")  # untracked source: it would be imported
    (repo / "notes.log").write_text("ignored\n")  # git-ignored: not source
    (repo / "data.bin").write_bytes(b"\0\1")  # untracked, not source
    with_new = capture_git(pkg)
    assert with_new.info["untracked"] == ["src/dpq/new_stage.py"]
    assert with_new.info["untracked_sha256"] and with_new.info["diff_sha256"] == state.info["diff_sha256"]
    assert "+y = 3" in with_new.patch and "new_stage.py" in with_new.patch
    (pkg / "new_stage.py").write_text("y = 4\n")
    assert capture_git(pkg).info["untracked_sha256"] != with_new.info["untracked_sha256"]
    saved = with_new.save(tmp_path / "prov")
    assert saved.read_text() == with_new.patch
    # the saved patch applies to the commit and reproduces the tree that ran
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    git(clone, "apply", str(saved))
    assert (clone / "src/dpq/a.py").read_text() == "x = 2\n"
    assert (clone / "src/dpq/new_stage.py").read_text() == "y = 3\n"
    # only untracked source files make a tree dirty
    clean = tmp_path / "repo2"
    pkg2 = make_repo(clean)
    (clean / "data.bin").write_bytes(b"\0")
    assert capture_git(pkg2).info["dirty"] is False
    (pkg2 / "b.py").write_text("z = 0\n")
    assert capture_git(pkg2).info["dirty"] is True


def test_outside_a_checkout_every_field_is_none(tmp_path):
    (tmp_path / "pkg").mkdir()
    info = capture_git(tmp_path / "pkg").info
    assert info["sha"] is None and info["dirty"] is None and info["diff_sha256"] is None


def test_the_source_hash_covers_every_py_file_and_nothing_else(tmp_path):
    a = make_repo(tmp_path / "a")
    assert provenance._tree_hash(a) == provenance._tree_hash(make_repo(tmp_path / "b"))
    (a / "README.txt").write_text("not code")
    (a / "__pycache__").mkdir()
    (a / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    provenance._tree_hash.cache_clear()
    assert provenance._tree_hash(a) == provenance._tree_hash(tmp_path / "b" / "src" / "dpq")
    (a / "sub").mkdir()
    (a / "sub" / "c.py").write_text("")
    provenance._tree_hash.cache_clear()
    assert provenance._tree_hash(a) != provenance._tree_hash(tmp_path / "b" / "src" / "dpq")


def test_results_json_of_a_dirty_tree_carries_the_diff_hash_captured_at_the_start(tmp_path, monkeypatch):
    """The dpq package a run uses lives in a (temporary) checkout with one line edited: the diff's
    hash is in results.json and the diff beside the run; a commit made while the run trains does
    not change what the run reports."""
    from dpq.train import train

    repo = tmp_path / "repo"
    pkg = make_repo(repo, provenance.PACKAGE_ROOT)
    f = pkg / "cost.py"
    f.write_text(f.read_text().replace("import math\n", "import math  # edited\n", 1))
    monkeypatch.setattr(provenance, "PACKAGE_ROOT", pkg)
    head = git(repo, "rev-parse", "HEAD").strip()
    diff = git(repo, "diff", "HEAD", "--binary")

    from dpq.run.context import RunContext

    real_fit = RunContext.fit

    def commit_while_training(self, *a, **k):  # the tree changes under the running process
        git(repo, "commit", "-q", "--allow-empty", "-am", "meanwhile")
        return real_fit(self, *a, **k)

    monkeypatch.setattr(RunContext, "fit", commit_while_training)
    cfg = compose_cfg(
        tmp_path,
        ["experiment=digits", "pipeline=dense", "trainer=debug", "cost.repeats=1", "cost.warmup=0"],
    )
    results = train(cfg)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["git"] == results["git"]
    assert results["git"]["sha"] == head != git(repo, "rev-parse", "HEAD").strip()
    assert results["git"]["dirty"] is True and "+import math  # edited" in diff
    assert results["git"]["diff_sha256"] == hashlib.sha256(diff.encode()).hexdigest()
    assert results["git"]["patch"] == "provenance/diff.patch"
    prov = tmp_path / "run" / "provenance"
    assert (prov / "diff.patch").read_text() == diff
    starts = json.loads((prov / "git.json").read_text())
    assert (
        len(starts) == 1
        and starts[0]["sha"] == head
        and starts[0]["diff_sha256"] == results["git"]["diff_sha256"]
    )


def test_a_diff_that_is_not_utf8_is_recorded_byte_for_byte_and_a_dangling_py_link_is_skipped(tmp_path):
    repo = tmp_path / "repo"
    pkg = make_repo(repo)
    (pkg / "latin.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "latin-1")
    (pkg / "latin.py").write_bytes("s = 'r\xe9sum\xe9'\n".encode("latin-1"))  # a run used to stop here
    (pkg / "new.py").write_bytes(b"b = '\xff'\n")
    state = capture_git(pkg)
    assert state.info["dirty"] is True and state.info["untracked"] == ["src/dpq/new.py"]
    raw = subprocess.run(["git", "-C", str(repo), "diff", "HEAD", "--binary"], capture_output=True).stdout
    assert state.info["diff_sha256"] == hashlib.sha256(raw).hexdigest()
    saved = state.save(tmp_path / "prov")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    git(clone, "apply", str(saved))
    assert (clone / "src/dpq/latin.py").read_bytes() == (pkg / "latin.py").read_bytes()
    assert (clone / "src/dpq/new.py").read_bytes() == b"b = '\xff'\n"

    before = provenance._tree_hash(pkg)
    (pkg / ".#latin.py").symlink_to("user@host.1234:1700000000")  # an editor's lock while a file is edited
    provenance._tree_hash.cache_clear()
    assert provenance._tree_hash(pkg) == before


def test_the_recorded_patch_does_not_depend_on_the_users_git_settings(tmp_path):
    """color.ui=always put escape codes into diff.patch and diff.noprefix=true headers `git apply` refuses:
    the same tree hashed differently and its patch could not be applied."""
    repo = tmp_path / "repo"
    pkg = make_repo(repo)
    (pkg / "a.py").write_text("x = 2\n")
    (pkg / "new.py").write_text("y = 3\n")
    plain = capture_git(pkg)
    git(repo, "config", "color.ui", "always")
    git(repo, "config", "diff.noprefix", "true")
    styled = capture_git(pkg)
    assert styled.info == plain.info and styled.patch == plain.patch and "\x1b[" not in styled.patch
    saved = styled.save(tmp_path / "prov")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    git(clone, "apply", str(saved))
    assert (clone / "src/dpq/a.py").read_text() == "x = 2\n" and (clone / "src/dpq/new.py").exists()


def test_results_json_lists_every_library_behind_its_numbers():
    versions = provenance.library_versions()
    assert {"torch", "torchao", "numpy", "tokenizers", "onnxruntime", "onnx", "scikit-learn"} <= set(versions)
