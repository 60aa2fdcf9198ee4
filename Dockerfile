# edgeopt serve: an OIP v2 (KServe v2 / Triton HTTP) inference service for an optimized ONNX model.
# Small image: python:3.11-slim + onnxruntime + FastAPI/uvicorn; no torch, no build tools.
#
#   docker build -t edgeopt-serve .
#   docker run --rm -p 8000:8000 -v "$PWD/out:/models:ro" edgeopt-serve
#   docker run --rm -p 8000:8000 -v "$PWD/out:/models:ro" edgeopt-serve /models/model.onnx --host 0.0.0.0 --max-batch 16
#
# The model's stored runtime (edgeopt.runtime metadata) is used; an OpenVINO-tuned model needs
# `pip install .[serve,openvino]` instead (or --runtime onnxruntime).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[serve]" && rm -rf /app/src /root/.cache

RUN useradd --system --uid 10001 --no-create-home edgeopt && mkdir -p /models
USER edgeopt
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2).status != 200)"

# exec form: edgeopt is PID 1 and gets SIGTERM directly, so in-flight requests finish before exit.
ENTRYPOINT ["edgeopt", "serve"]
CMD ["/models/model.onnx", "--host", "0.0.0.0", "--port", "8000"]
