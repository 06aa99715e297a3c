"""CPU thread count: fewer torch threads when other work shares the cores, and the CLI says so."""
from __future__ import annotations

import pytest
import torch

from lolcats.threads import ENV_VAR, choose_threads


@pytest.mark.parametrize("load, expected", [(0.0, 2), (0.4, 2), (0.6, 1), (1.0, 1), (2.1, 1), (7.5, 1)])
def test_threads_left_by_the_load(load, expected):
    threads, note = choose_threads(2, 2, load, {})
    assert threads == expected
    assert (note is None) == (expected == 2)
    if note:
        assert f"load average is {load:.1f} on 2 cores" in note and "using 1 torch thread " in note and ENV_VAR in note


def test_never_more_threads_than_torch_chose_and_user_settings_win():
    assert choose_threads(4, 8, 0.0, {}) == (4, None)  # 8 idle cores: torch's own choice stands
    assert choose_threads(8, 8, 5.0, {})[0] == 3
    assert choose_threads(2, 2, 3.0, {ENV_VAR: "2"}) == (2, None)
    assert choose_threads(2, 2, 3.0, {"OMP_NUM_THREADS": "2"}) == (2, None)
    for bad in ("0", "many"):
        with pytest.raises(ValueError, match=ENV_VAR):
            choose_threads(2, 2, 0.0, {ENV_VAR: bad})


def test_cli_uses_one_thread_on_a_loaded_machine_and_says_so(monkeypatch, capsys, tmp_path):
    """As a command line (main() reading sys.argv): 1 thread and a note once the work starts; a bad
    path stays a one-line error; main([...]) from Python leaves the caller's threads alone."""
    from lolcats.cli import main
    from test_generation import tiny_tokenizer
    from tiny_models import tiny_model

    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    before = torch.get_num_threads()
    for var in (ENV_VAR, "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("os.getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setattr("lolcats.threads.available_cores", lambda: 2)

    def cli(*argv):
        monkeypatch.setattr("sys.argv", ["lolcats", *argv])
        return main()

    try:
        torch.set_num_threads(2)
        assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
        assert torch.get_num_threads() == 2  # called from Python: not ours to change
        capsys.readouterr()
        assert cli("generate", str(tmp_path / "missing"), "--prompt", "x") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert torch.get_num_threads() == 1
        assert len(err) == 1 and "does not exist" in err[0]  # (no note: no work started)
        torch.set_num_threads(2)
        assert cli("generate", str(base), "--prompt", "w7", "--max-new-tokens", "2") == 0
        err = capsys.readouterr().err.strip().splitlines()
        assert torch.get_num_threads() == 1
        assert err == ["note: the load average is 9.0 on 2 cores, so other work shares them; using 1 torch "
                       f"thread instead of 2 (set {ENV_VAR}=N to choose)"], err
        monkeypatch.setenv(ENV_VAR, "x")
        assert cli("generate", str(base), "--prompt", "w7") == 2
        assert capsys.readouterr().err.startswith(f"lolcats generate: error: {ENV_VAR} must be")
    finally:
        torch.set_num_threads(before)
