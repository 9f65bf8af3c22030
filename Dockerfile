# One image for the API, the migrate step and both workers; the command picks the role.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 BIT_HOME=/data
WORKDIR /app

# torch: a GPU deployment installs the CUDA build of the same release (the default wheel
# from PyPI for linux x86_64 is the CUDA build). The s3 extra lets the workers and API of
# several hosts share one bucket (BIT_ARTIFACTS_URL=s3://...); the onnxruntime extra is the
# CPU inference backend that `auto` picks. Migrations, templates and
# static files are package data: the installed package needs nothing from this folder.
COPY pyproject.toml README.md ./
COPY bit_core ./bit_core
COPY service ./service
COPY worker ./worker
RUN pip install --no-cache-dir '.[s3,onnxruntime]'

RUN useradd --create-home --uid 1000 bit && mkdir -p /data && chown bit /data
USER bit
WORKDIR /data
EXPOSE 8000
CMD ["bit", "api", "--host", "0.0.0.0", "--port", "8000"]
