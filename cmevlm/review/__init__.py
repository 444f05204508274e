"""`cmevlm review`: the surgeon's side of the loop, a small local web app (paper, Section 2:
datasets "partially supervised by a surgical expert").

Three queues, each read from the run's workdir and each writing the file a stage already reads:

    answers      review/answers.parquet (teach)      -> teacher/reviews.jsonl      (accept | edit | reject)
    preferences  review/preferences.parquet (prefer) -> preferences/reviews.jsonl  (accept | swap | reject)
    expert       eval/expert_sheet.csv (evaluate)    -> eval/expert_reviews.jsonl  (scores 1-5, preferred)

`queues.py` reads (no web code); `app.py` is the FastAPI app and its security; the pages are
plain Jinja templates and one small script, all served from this package (no CDN, no build).
"""
