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
