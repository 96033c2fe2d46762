"""`fastgpt generate`: continues a prompt from a checkpoint (or a random GPT-2 small), streaming tokens."""

import os
import signal
import subprocess
import sys

import pytest
import torch

import fastgpt
from fastgpt import cli


pytestmark = pytest.mark.usefixtures("single_thread")


def _tiny_checkpoint(folder, emb_dim: int):
    """A tiny model with GPT-2's vocabulary (2 heads of emb_dim / 2), saved as a Hugging Face folder."""
    torch.manual_seed(0)
    fastgpt.GPTModel({"vocab_size": 50257, "context_length": 32, "emb_dim": emb_dim, "n_heads": 2, "n_layers": 2,
                      "drop_rate": 0.0, "qkv_bias": True}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _tiny_checkpoint(tmp_path_factory.mktemp("tiny-gpt2"), emb_dim=32)


def expected_text(checkpoint, prompt, new_tokens, **sampling):
    tok = fastgpt.get_tokenizer()
    model = fastgpt.from_pretrained(checkpoint)
    seed = sampling.pop("seed", 123)
    ids = fastgpt.generate(model, fastgpt.text_to_token_ids(prompt, tok), new_tokens, 32, eos_id=50256,
                           generator=torch.Generator().manual_seed(seed), **sampling)
    return fastgpt.token_ids_to_text(ids, tok)


def _fastgpt(*args, cwd):
    # A scratch folder as working directory keeps the repository root off sys.path.
    # The CLI on a CPU: a GPU machine hides its GPUs from it.
    return subprocess.run([sys.executable, "-m", "fastgpt", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env={**os.environ, "FASTGPT_BACKEND": "", "TRITON_INTERPRET": "0",
                                            "CUDA_VISIBLE_DEVICES": ""})


def test_generate_from_a_checkpoint_prints_the_models_continuation(checkpoint, tmp_path):
    result = _fastgpt("generate", "Every effort moves you", "--checkpoint", str(checkpoint),
                      "--max-new-tokens", "12", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_text(checkpoint, "Every effort moves you", 12) + "\n"
    assert "new tokens in" in result.stderr and "tokens/s" in result.stderr
    assert "Traceback" not in result.stderr


def test_sampling_options_are_seeded_and_reach_the_sampler(checkpoint, capsys):
    args = ["generate", "Hello, I am", "--checkpoint", str(checkpoint), "--max-new-tokens", "10",
            "--temperature", "1.5", "--top-k", "40", "--top-p", "0.9", "--seed", "7"]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert cli.main(args) == 0
    assert capsys.readouterr().out == first
    assert first == expected_text(checkpoint, "Hello, I am", 10, temperature=1.5, top_k=40, top_p=0.9,
                                  seed=7) + "\n"
    assert cli.main(args[:-1] + ["8"]) == 0
    assert capsys.readouterr().out != first


def test_tokens_are_printed_as_they_are_generated(checkpoint, monkeypatch, capsys):
    events = []
    real_stream = fastgpt.generation.generate_stream

    def recording_stream(*args, **kwargs):
        for column in real_stream(*args, **kwargs):
            events.append("token")
            yield column

    real_print = print
    monkeypatch.setattr(fastgpt.generation, "generate_stream", recording_stream)
    monkeypatch.setattr("builtins.print", lambda *a, **k: (events.append("print"), real_print(*a, **k)))
    assert cli.main(["generate", "Hi", "--checkpoint", str(checkpoint), "--max-new-tokens", "4"]) == 0
    tokens_then_prints = "".join("t" if e == "token" else "p" for e in events)
    assert "tptptptp" in tokens_then_prints  # each token is printed before the next is computed


def test_no_checkpoint_means_a_random_gpt2_small_with_a_notice(tmp_path):
    result = _fastgpt("generate", "Hello", "--max-new-tokens", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello")
    notice = [line for line in result.stderr.splitlines() if "random GPT-2 small" in line]
    assert len(notice) == 1 and "untrained" in notice[0]


def _default_sigint():
    """In the child, before Python starts: SIGINT's default disposition, so that Python installs its
    KeyboardInterrupt handler (it leaves an inherited SIG_IGN alone)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_closed_pipe_and_ctrl_c_end_quietly(checkpoint, tmp_path):
    command = [sys.executable, "-m", "fastgpt", "generate", "Hello", "--checkpoint", str(checkpoint),
               "--max-new-tokens", "1000"]
    env = {**os.environ, "FASTGPT_BACKEND": "", "TRITON_INTERPRET": "0"}
    # `| head -c 5`: the reader leaves after five bytes.
    reader = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env)
    assert reader.stdout.read(5) == b"Hello"
    reader.stdout.close()
    _, err = reader.communicate(timeout=300)
    assert reader.returncode == 1 and b"Traceback" not in err, err.decode()
    # Ctrl-C while tokens stream.
    # SIGINT's disposition is inherited: a test run started in the background (`pytest &`) ignores it, and so
    # would the child, which then never sees the Ctrl-C sent below. The child sets its own.
    running = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env,
                               preexec_fn=_default_sigint)
    assert running.stdout.read(5) == b"Hello"
    running.send_signal(signal.SIGINT)
    _, err = running.communicate(timeout=300)
    assert running.returncode == 130, err.decode()
    assert b"fastgpt generate: interrupted" in err and b"Traceback" not in err, err.decode()


def test_what_is_cropped_or_ignored_is_said(checkpoint, capsys):
    long_prompt = "word" + " word" * 39  # 40 tokens, over the context of 32
    assert cli.main(["generate", long_prompt, "--checkpoint", str(checkpoint), "--max-new-tokens", "2",
                     "--top-k", "5"]) == 0
    err = capsys.readouterr().err
    assert "the prompt is 40 tokens, more than the model's context of 32: it sees the last 32" in err
    assert "--top-k and --top-p shape sampling only; with --temperature 0 (the default)" in err
    assert cli.main(["generate", "Hi", "--checkpoint", str(checkpoint), "--max-new-tokens", "2", "--top-k", "5",
                     "--temperature", "1"]) == 0
    err = capsys.readouterr().err
    assert "prompt is" not in err and "--top-k" not in err


def test_n_heads_reaches_a_state_dict_without_one(tmp_path, capsys):
    cfg = {"vocab_size": 50257, "context_length": 16, "emb_dim": 768, "n_heads": 8, "n_layers": 1,
           "drop_rate": 0.0, "qkv_bias": False}
    torch.manual_seed(0)
    trained = fastgpt.GPTModel(cfg).eval()
    torch.save(trained.state_dict(), tmp_path / "model.pth")
    args = ["generate", "Hello", "--checkpoint", str(tmp_path / "model.pth"), "--max-new-tokens", "3"]
    assert cli.main(args) == 0
    assumed = capsys.readouterr()
    assert "[fastgpt] warning: " in assumed.err and "assuming n_heads=12" in assumed.err
    assert cli.main(args + ["--n-heads", "8"]) == 0
    given = capsys.readouterr()
    assert "warning" not in given.err
    tok = fastgpt.get_tokenizer()
    ids = fastgpt.generate(trained, fastgpt.text_to_token_ids("Hello", tok), 3, 16, eos_id=50256)
    assert given.out == fastgpt.token_ids_to_text(ids, tok) + "\n"


@pytest.mark.parametrize("args,fragment", [
    (["generate", ""], "the prompt is empty"),
    (["generate", "x", "--top-p", "1.5"], "must be in (0, 1], got 1.5"),
    (["generate", "x", "--temperature", "-1"], "must be a finite number >= 0, got -1"),
    (["generate", "x", "--max-new-tokens", "0"], "must be a positive integer, got 0"),
    (["generate", "x", "--top-k", "0"], "must be a positive integer, got 0"),
    (["generate", "x", "--backend", "cuda"], "invalid choice: 'cuda'"),
    (["generate", "x", "--checkpoint", "/nonexistent/gpt2"], "checkpoint /nonexistent/gpt2 does not exist"),
])
def test_bad_input_exits_2_with_a_message(args, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_a_missing_checkpoint_is_refused_before_torch_is_imported(tmp_path):
    code = ("import sys\nfrom fastgpt.cli import main\n"
            "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as stop:\n    code = stop.code\n"
            "print(code, 'torch' in sys.modules)")
    missing = tmp_path / "no-such-gpt2"
    result = subprocess.run([sys.executable, "-c", code, "generate", "x", "--checkpoint", str(missing)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "FASTGPT_BACKEND": "", "CUDA_VISIBLE_DEVICES": ""})
    assert result.stdout == "2 False\n", result.stderr
    assert result.stderr == f"fastgpt generate: error: checkpoint {missing} does not exist\n"


def test_forced_triton_that_cannot_run_here_is_refused_before_the_prompt_is_printed(checkpoint, tmp_path):
    result = _fastgpt("generate", "Hello", "--checkpoint", str(checkpoint), "--backend", "triton", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""  # not even the prompt
    assert result.stderr.startswith("fastgpt generate: error: backend 'triton' is forced on a cpu device; ")
    assert "TRITON_INTERPRET=1" in result.stderr and "Traceback" not in result.stderr


def test_an_error_while_generating_starts_a_line_of_its_own(checkpoint, monkeypatch, capsys):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # forced Triton may run on a CPU: refused only at the first op
    monkeypatch.setattr(fastgpt.ops, "_triton_kernel", lambda op: (None, lambda *args, **kwargs: "not today"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "Hello", "--checkpoint", str(checkpoint), "--backend", "triton", "--device", "cpu"])
    assert exit_info.value.code == 2
    given = capsys.readouterr()
    assert given.out == "Hello\n"  # the prompt, then the line ended
    assert given.err.startswith("fastgpt generate: error: ")
    assert "the Triton kernel does not support this case: not today" in given.err


def test_a_bad_checkpoint_is_reported_without_a_traceback(checkpoint, tmp_path):
    (tmp_path / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes()[:-50])
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    result = _fastgpt("generate", "x", "--checkpoint", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert "model.safetensors: tensor" in result.stderr and "the file is truncated" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def kernel_checkpoint(tmp_path_factory):
    """Like ``checkpoint``, with a head size the attention kernels take (32)."""
    return _tiny_checkpoint(tmp_path_factory.mktemp("tiny-gpt2-d32"), emb_dim=64)


@pytest.mark.kernels
def test_generate_with_forced_triton_takes_prompts_of_any_length(kernel_checkpoint, tmp_path):
    checkpoint = kernel_checkpoint
    # Under the interpreter (a CPU machine's Triton): a 22-token prompt (past the decode
    # kernel's 16 queries: the attention forward prefills it), decoding, then past the
    # 32-token context (each window re-prefilled). The text equals eager's.
    prompt = "Every effort moves you, and every step you take is a step toward the end of it all"
    assert len(fastgpt.text_to_token_ids(prompt, fastgpt.get_tokenizer())[0]) > 16
    result = subprocess.run([sys.executable, "-m", "fastgpt", "generate", prompt, "--checkpoint", str(checkpoint),
                             "--max-new-tokens", "14", "--backend", "triton"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=600,
                            env={**os.environ, "FASTGPT_BACKEND": "", "TRITON_INTERPRET": "1",
                                 "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_text(checkpoint, prompt, 14) + "\n"
