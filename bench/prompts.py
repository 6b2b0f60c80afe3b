"""A held-out prompt set for float-reference agreement: plain text continuations and chat questions.

`agreement_ids(engine)` gives each prompt's token ids (chat ones through the model's chat template), so
every engine compared is fed exactly the same tokens.
"""

from __future__ import annotations

PLAIN = [
    "The history of the printing press begins in",
    "In the middle of the forest there was a small cabin where",
    "Photosynthesis is the process by which plants",
    "The recipe calls for two cups of flour, one egg and",
    "Once the rain had stopped, the children ran outside and",
    "The main causes of the French Revolution were",
    "A binary search tree is a data structure in which",
    "The old lighthouse keeper climbed the stairs every evening to",
    "Water boils at 100 degrees Celsius at sea level, but on a mountain",
    "The first rule of good writing is",
    "In 1969, the Apollo 11 mission",
    "To change a flat tyre, you first need to",
    "The city council announced on Monday that",
    "Volcanoes form when",
    "My grandmother always told me that the secret to a happy life was",
    "The train left the station at exactly nine o'clock, and",
    "Machine learning models learn patterns from data by",
    "The museum's newest exhibit features",
    "Honey bees communicate with each other through",
    "The best way to learn a new language is",
    "At the bottom of the ocean, where no light reaches,",
    "The committee reviewed the proposal and concluded that",
    "Coffee was first discovered in",
    "The detective looked at the muddy footprints and said",
]

CHAT = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain what a black hole is in simple terms.",
    "Write a haiku about autumn leaves.",
    "How do I reverse a list in Python?",
    "What are the benefits of regular exercise?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Why is the sky blue?",
    "What is the difference between weather and climate?",
    "Suggest a name for a friendly robot.",
    "How many legs does a spider have?",
    "What should I pack for a weekend camping trip?",
    "Translate 'good morning' into Spanish and French.",
    "What is 15 multiplied by 12?",
    "Describe the taste of a lemon to someone who has never had one.",
    "What causes the seasons on Earth?",
    "Write a short thank-you note to a teacher.",
    "What is an API?",
    "Name three famous painters and one work by each.",
    "How does a refrigerator keep food cold?",
    "What is the tallest mountain in the world?",
    "Give me a simple recipe for pancakes.",
    "What is the meaning of the word 'ephemeral'?",
    "How can I stay focused while studying?",
]


def agreement_ids(engine) -> list[list[int]]:
    """Token ids of every prompt as `engine` (a kvtrove Engine) tokenizes them: the plain ones as they are,
    the chat ones as a user turn of the model's chat template with the assistant's turn opened."""
    plain = [engine.tokenize(p) for p in PLAIN]
    chat = [engine.chat_prompt([{"role": "user", "content": q}])["prompt_token_ids"] for q in CHAT]
    return plain + chat
