"""Evaluation of nanochat checkpoints on ScienceQA (sciassist.eval.run has the overview).

questions  which questions, read from where, and the prompt each model sees
scoring    reading a model's answer: letter / choice scoring, greedy generation
models     one model: where it comes from and running it on the questions
table      the ScienceQA table, chance and majority rows, Wilson intervals, topics
report     the files: results format, per-question lines, plots, samples.md, report.md
run        EvalSettings, evaluate(), evaluate_after_training(), the command line
"""
