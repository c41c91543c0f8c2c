"""A procedural video world for training and probing small text-to-video models (issue 6).

``world.scenes`` draws deterministic clips of coloured shapes (one, or two in the detail prompts)
moving on a plain background, with template captions; ``world.probe`` reads a clip back
(background, colour, shape, motion) with plain image processing, to score how well a generated
video follows its prompt.

Kept light on purpose: numpy only, no torch, and nothing is imported here until asked for.
"""
