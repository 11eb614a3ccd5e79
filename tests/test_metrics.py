"""The scorer's core, row by row: ROUGE-L recall, exact match, the official decoding and the
MMLU letter choice, each against values worked out by hand."""

from types import SimpleNamespace

import pytest
import torch

from unlearn.data.mmlu import LETTERS, Question
from unlearn.measure.generation import decode
from unlearn.measure.metrics import knowledge, regurgitation, row_score
from unlearn.measure.mmlu import letter_token_ids, mmlu_correct
from unlearn.models.tokenizer import train_tokenizer


def test_regurgitation_is_rouge_l_recall_of_the_expected_text():
    expected = "the cat sat on the mat"  # 6 tokens
    # every expected token in order, then more: recall 1 (precision 6/11, F1 0.71 would differ)
    assert regurgitation(expected, expected + " and then it ran far away") == 1.0
    # a prefix of 2 of the 6 tokens: recall 1/3 (precision and F1 would be 1 and 0.5)
    assert regurgitation(expected, "the cat") == pytest.approx(2 / 6)
    # longest common subsequence, not overlap: "mat ... cat" keeps 1 of its 2 in order
    assert regurgitation("cat mat", "mat cat") == pytest.approx(1 / 2)
    assert regurgitation(expected, "") == 0.0


def test_knowledge_is_exact_match_after_strip_and_lowercase():
    assert knowledge("Paris", "  paris\n") == 1
    assert knowledge("Paris", "Paris, France") == 0
    assert knowledge("New York", "newyork") == 0
    assert row_score("qa", "Paris", "PARIS ") == 1.0
    assert row_score("sc", "a b c d", "a b") == pytest.approx(0.5)


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["Hello , world . The answer is A , B , C or D ."] * 20
    return train_tokenizer(texts, vocab_size=300)


def test_decode_skips_special_tokens_and_cleans_up_tokenization_spaces(tokenizer):
    ids = tokenizer("Hello , world .", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids).endswith(" .")  # the raw text keeps the spaces
    assert decode(tokenizer, ids + [tokenizer.eos_token_id]) == "Hello, world."


class LastTokenPicksLetter(torch.nn.Module):
    """A scripted model: at every position the highest logit among the answer letters is the
    letter ``input_id % 4``; a non-letter token scores higher still, which must be ignored."""

    def __init__(self, letter_ids: list[int], vocab: int):
        super().__init__()
        self.letter_ids, self.vocab = letter_ids, vocab
        self.config = SimpleNamespace(max_position_embeddings=4096)
        self.device = torch.device("cpu")
        self.recorded_graph = False

    def forward(self, input_ids, attention_mask, logits_to_keep=0, use_cache=True):
        # a forward under autograd keeps every layer's input (the README's eval row at OLMo-1B)
        self.recorded_graph |= torch.is_grad_enabled()
        input_ids = input_ids[:, -logits_to_keep:]  # as HF's models: 0 keeps every position
        logits = torch.zeros(*input_ids.shape, self.vocab)
        picked = torch.tensor(self.letter_ids)[input_ids % 4]
        logits.scatter_(-1, picked.unsqueeze(-1), 1.0)
        non_letter = next(i for i in range(self.vocab) if i not in self.letter_ids)
        logits[..., non_letter] = 10.0
        return SimpleNamespace(logits=logits)


def test_mmlu_takes_the_likeliest_letter_after_the_prompt(tokenizer):
    short = Question("x", "Q?", ("a", "b", "c", "d"), "A")
    longer = Question("x", "A much longer question , is it not ?", ("a", "b", "c", "d"), "A")
    model = LastTokenPicksLetter(letter_token_ids(tokenizer), len(tokenizer))
    chosen = LETTERS[tokenizer(short.prompt).input_ids[-1] % 4]  # both prompts end "Answer:"
    questions = [Question(q.subject, q.question, q.choices, letter)
                 for q in (short, longer) for letter in LETTERS]
    # read at the last real token of each left-padded row: right padding would read a pad
    expected = [q.answer == chosen for q in questions]
    assert mmlu_correct(model, tokenizer, questions) == expected
    assert sum(expected) == 2
    assert not model.recorded_graph  # as the official scorer calls it: no graph recorded


def test_mmlu_shows_five_dev_questions_and_drops_shots_until_the_prompt_fits(tokenizer, tmp_path):
    from unlearn.data.mmlu import load_mmlu, write_questions
    from unlearn.measure.mmlu import prompt_ids
    (tmp_path / "test").mkdir()
    (tmp_path / "dev").mkdir()
    dev = [Question("x", f"Dev {i} ?", ("a", "b", "c", "d"), "B") for i in range(6)]
    write_questions(tmp_path / "dev" / "world_facts_dev.csv", dev)
    write_questions(tmp_path / "test" / "world_facts_test.csv",
                    [Question("x", "Test ?", ("a", "b", "c", "d"), "C")])
    [question] = load_mmlu(tmp_path)
    assert [s.question for s in question.shots] == [f"Dev {i} ?" for i in range(5)]
    assert question.prompt.startswith(
        "The following are multiple choice questions (with answers) about  world facts.\n\n"
        "Dev 0 ?\nA. a\nB. b\nC. c\nD. d\nAnswer: B\n\nDev 1 ?")
    assert question.prompt.endswith("Dev 4 ?\nA. a\nB. b\nC. c\nD. d\nAnswer: B\n\n"
                                    "Test ?\nA. a\nB. b\nC. c\nD. d\nAnswer:")
    sizes = [len(tokenizer(question.prompt_with(k), add_special_tokens=False).input_ids)
             for k in range(6)]
    assert prompt_ids(tokenizer, question, sizes[5]) == tokenizer(
        question.prompt, add_special_tokens=False).input_ids
    # one token short of all five shots: the harness drops the last shot, then tries again
    assert len(prompt_ids(tokenizer, question, sizes[5] - 1)) == sizes[4]
    # too long even alone: its end, the question, is kept
    assert len(prompt_ids(tokenizer, question, sizes[0] - 3)) == sizes[0] - 3
