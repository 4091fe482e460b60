import json

from phiedge.checkpoints.corpus import split_files, stdlib_files, write_calibration


def test_held_out_files_are_not_trained_on():
    train_files, eval_files = split_files()
    assert eval_files and not set(train_files) & set(eval_files)
    assert sorted(train_files + eval_files) == stdlib_files()


def test_calibration_from_the_training_split(tmp_path):
    path = tmp_path / "c.jsonl"
    assert write_calibration(path, samples=5, chars=100) == 5
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 5 and all(0 < len(r["text"]) <= 100 for r in rows)
    held_out = {f.read_text(errors="replace")[:100] for f in split_files()[1]}
    assert not {r["text"] for r in rows} & held_out


def test_calibration_from_a_users_file(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abc" * 100)
    assert write_calibration(tmp_path / "c.jsonl", text, samples=10, chars=120) == 3
