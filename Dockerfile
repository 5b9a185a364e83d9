# One image for every chatjobs process: api, worker, beat, flower, migrate and the simulator.
# Everything is installed at build time; nothing is fetched when a container runs.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app

# Dependencies first, against empty package stubs, so editing code does not reinstall them.
# The install is editable because chatjobs finds migrations/ next to its package directory
# (Path(chatjobs.__file__).parent.parent / "migrations"); a site-packages copy would not.
COPY pyproject.toml README.md ./
RUN mkdir chatjobs api worker \
 && touch chatjobs/__init__.py api/__init__.py worker/__init__.py \
 && pip install --no-cache-dir -e .

COPY . .

RUN useradd --create-home --uid 10001 chatjobs
USER chatjobs

EXPOSE 8000 5555 8100
CMD ["chatjobs", "api", "--host", "0.0.0.0"]
