"""kmtrain.data: reading documents (and the errors that name the bad file), ids, chunks, Q/A parsing."""
import pytest

from conftest import tiny_cfg
from kmtrain import DocumentError, IndexConfig, index, load_documents
from kmtrain.data import chunk_tokens, parse_qa, sanitize_id


def test_bad_inputs_name_the_file(tmp_path, tiny_model):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "ok.txt").write_text("fine text")
    (d / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DocumentError, match="latin.txt: not valid UTF-8"):
        load_documents(str(d))
    (d / "latin.txt").unlink()
    (d / "empty.md").write_text("   \n")
    with pytest.raises(DocumentError, match="empty.md.*empty"):
        load_documents(str(d))
    (d / "empty.md").unlink()
    (d / "ok.md").write_text("same stem")
    with pytest.raises(DocumentError, match="duplicate document id 'ok'"):
        load_documents(str(d))
    j = tmp_path / "docs.jsonl"
    j.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(DocumentError, match=r"docs.jsonl:2: duplicate document id 'a'"):
        load_documents(str(j))
    j.write_text('{"id": "a", "text": "x"}\nnot json\n')
    with pytest.raises(DocumentError, match=r"docs.jsonl:2: invalid JSON"):
        load_documents(str(j))
    # nothing is written when the input is bad
    out = tmp_path / "never"
    with pytest.raises(DocumentError):
        index(str(d), tiny_cfg(tiny_model, out))
    assert not out.exists()
    with pytest.raises(ValueError, match="objective"):
        IndexConfig(objective="xyz").validate()


def test_ids_chunks_and_qa_parsing():
    assert sanitize_id("My Doc/../x?.txt") == "My_Doc_.._x_.txt"  # one path component, never a traversal
    assert sanitize_id("../../etc") == "etc"
    assert len(sanitize_id("a" * 300)) <= 100
    chunks = chunk_tokens(list(range(100)), 40, 0.1)
    assert chunks[0] == list(range(40)) and chunks[1][0] == 36 and chunks[-1][-1] == 99
    assert parse_qa("Question: Who? Answer: Ida.\nQuestion: When?\nAnswer: Tuesday") == [("Who?", "Ida."), ("When?", "Tuesday")]
    assert parse_qa("no pairs here") == []
