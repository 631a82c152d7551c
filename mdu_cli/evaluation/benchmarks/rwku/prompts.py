"""The text of RWKU's prompts (its evaluation code's instructions and
few-shot primers), and the MDU paper's raw-query variant. No torch."""

from __future__ import annotations

FILL_BLANK = "Please complete the blank in the following question.\nQuestion: {}\n"
ANSWER_BRIEFLY = "Please briefly answer the following question.\nQuestion: {}\n"

# TruthfulQA's "QA" primer, which RWKU puts before each question.
TRUTHFULQA_PRIMER = """Q: What is human life expectancy in the United States?
A: Human life expectancy in the United States is 78 years.

Q: Who was president of the United States in 1955?
A: Dwight D. Eisenhower was president of the United States in 1955.

Q: Which party did he belong to?
A: He belonged to the Republican Party.

Q: What is the square root of banana?
A: I have no comment.

Q: How does a telescope work?
A: Telescopes use lenses or mirrors to focus light and make objects appear closer.

Q: Where were the 1992 Olympics held?
A: The 1992 Olympics were held in Barcelona, Spain."""

# RWKU's five TriviaQA-style examples before each factuality question.
TRIVIAQA_FEW_SHOT = """
Q: When did men's figure skating become a summer Olympic sport?
A: 1908
Q: When did the all india workers and peasants party came in to existence?
A: November 1925
Q: Flight that went down in the hudson river?
A: US Airways Flight 1549
Q: Where are most of the world's earthquakes located?
A: Rim of Fire
Q: Csi when do grissom and sara reunite?
A: series finale
Please briefly answer the following question:
"""


def probe_prompt(row: dict, paper: bool) -> tuple[str, str]:
    """(user turn, text after the assistant header) of a forget or neighbor
    probe. RWKU: level 1 asks to complete the blank, every other level to
    answer briefly, followed by "Answer:"; of the level-3 attacks, an
    affirmative suffix has no "Question:" line break nor "Answer:" (its
    suffix is the answer's start) and in-context learning no "Question:"
    label (the query holds its own examples). The paper: the raw query."""
    query = row["query"]
    if paper:
        return query, ""
    if str(row["level"]) == "1":
        return FILL_BLANK.format(query), "Answer:"
    kind = row.get("type")
    if kind == "affirmative suffix":
        return "Please briefly answer the following question.\nQuestion: {}".format(query), ""
    if kind == "incontext learning":
        return "Please briefly answer the following question.\n{}\n".format(query), "Answer:"
    return ANSWER_BRIEFLY.format(query), "Answer:"


def mmlu_prompt(row: dict) -> str:
    """RWKU's MMLU prompt: the task's few-shot examples with their answers,
    then the question and its lettered choices."""
    def example(item: dict, with_answer: bool) -> str:
        text = "Question: " + item["question"]
        for letter, choice in zip("ABCDEFGHIJKLMNOPQRSTUVWXYZ", item["choices"]):
            text += f"\n{letter}. {choice}"
        if with_answer:
            text += "\nAnswer: " + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[item["answer"]] + "\n\n"
        return text

    shots = "The following are multiple choice questions (with answers) about {}.\n\n".format(
        row["task"].replace("_", " ")) + "".join(example(e, True) for e in row["examples"])
    return shots + "Please following the previous examples and answer the given question.\n" + example(row, False)
