"""The top-level command lists only implemented subcommands and each one answers --help."""

from click.testing import CliRunner

from safealign.cli import main


def test_help_lists_the_implemented_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    lines = result.output.split("Commands:")[1].splitlines()
    listed = {line.split()[0] for line in lines if line.startswith("  ") and line[2] != " "}
    assert listed == set(main.commands)
    for name in main.commands:
        sub = CliRunner().invoke(main, [name, "--help"])
        assert sub.exit_code == 0, (name, sub.output)


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and "safealign" in result.output


def test_bad_input_is_one_line_with_exit_2_and_debug_shows_the_error(tmp_path):
    missing = str(tmp_path / "missing")
    args = ["recover", "--aligned", missing, "--finetuned", missing, "--out", str(tmp_path / "o")]
    harmful = tmp_path / "h.jsonl"
    harmful.write_text('{"prompt": "p"}\n')
    args += ["--no-utility-check", "--quiet", "--harmful", str(harmful)]
    result = CliRunner().invoke(main, args)
    assert (result.exit_code, result.output) == (2, f"Error: checkpoint not found: {missing}\n")
    debug = CliRunner().invoke(main, [*args, "--debug"])
    assert isinstance(debug.exception, ValueError)
    assert "checkpoint not found" in str(debug.exception)
    assert not (tmp_path / "o").exists()


def test_several_problems_are_joined_on_one_line(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = ["merge", "--method", "interpolate", "--aligned", one, "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(main, [*args, "--finetuned", two])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1
    problems = result.output.removeprefix("Error: ").rstrip("\n").split("; ")
    assert sorted(problems) == [f"model folder not found: {p}" for p in (one, two)]


def test_the_lab_table_is_left_out_of_the_progress_lines():
    from safealign.lab.cli import without_table
    from safealign.lab.phenomenon import format_table

    table = {"aligned": {"harmful_rate": 0.0, "n_harmful": 1, "n_benign": 1, "n_task": 1}}
    lines: list[str] = []
    log = without_table(lines.append)
    log("lab 1234: unaligned done in 1.0s")
    log(format_table(table, []))
    assert lines == ["lab 1234: unaligned done in 1.0s"]
