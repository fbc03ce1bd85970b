"""Prompt templates."""

# The R1-Zero template, verbatim from the DeepSeek-R1 paper (Table 1), as one
# line. The paper puts a period after {prompt}, so prompts should not end in
# punctuation of their own (tiny-world questions never do).
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the "
    "Assistant solves it. The assistant first thinks about the reasoning process in "
    "the mind and then provides the user with the answer. The reasoning process and "
    "answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer "
    "here </answer>. User: {prompt}. Assistant:"
)


def r1_zero_prompt(question: str) -> str:
  """Fills the R1-Zero template; the completion starts right after 'Assistant:'."""
  return R1_ZERO_TEMPLATE.format(prompt=question)


# The DeepSeek-R1 usage recommendation for math (model card, "Usage
# Recommendations"): the directive goes in the user turn, no system prompt.
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# The R1 / R1-Distill chat format (their tokenizer_config.json chat_template for
# one user turn with the generation prompt). The completion starts inside the
# thinking block: the template ends with "<think>\n", as the model card advises
# enforcing so the model does not skip its reasoning.
R1_USER, R1_ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
R1_BOS = "<｜begin▁of▁sentence｜>"
R1_CHAT_TEMPLATE = "{bos}" + R1_USER + "{prompt}" + R1_ASSISTANT + "<think>\n"


def r1_chat_prompt(question: str, *, instruction: str = MATH_INSTRUCTION,
                   bos: str | None = R1_BOS) -> str:
  """One R1 chat turn: BOS, the user's question then `instruction` ("" for none) on
  its own line, and the assistant turn opened with "<think>\\n"."""
  prompt = f"{question}\n{instruction}" if instruction else question
  return R1_CHAT_TEMPLATE.format(bos=bos or "", prompt=prompt)
