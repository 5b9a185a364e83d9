"""OpenAI-compatible batches over chatjobs' own jobs: every line of an input file is a job.

- ``lines``: one input line checked as OpenAI checks it (pure);
- ``service``: create, read, list, cancel, retry; validation and storage of the lines;
- ``progress``: counts that move as lines end, and the batch's end with its last line;
- ``output``: the output and error files, read from the jobs, never assembled.
"""
