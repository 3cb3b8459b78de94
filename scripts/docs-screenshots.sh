#!/usr/bin/env bash
# Re-make the screenshots of docs/dashboard.md: run the browser tests (they save screenshots of every
# page on the bundled fixtures and of the HTML report under test-artifacts/), then copy the ones the
# docs show into docs/img/, palette-compressed with pngquant when it is installed (apt-get install pngquant).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q -p no:dash tests/test_dashboard_browser.py
mkdir -p docs/img
while read -r src dst; do
  if command -v pngquant >/dev/null 2>&1; then
    pngquant --quality 60-85 --speed 1 --force --output "docs/img/$dst" "test-artifacts/$src"
  else
    cp "test-artifacts/$src" "docs/img/$dst"
  fi
done <<'LIST'
dashboard-overview-finding-decode.png dashboard-overview.png
dashboard-timeline-ddp-2gpu.png dashboard-timeline.png
dashboard-timeline-step.png dashboard-timeline-step.png
dashboard-kernels-nsys.png dashboard-kernels.png
dashboard-summaries-torch.png dashboard-summaries.png
dashboard-roofline-ncu.png dashboard-roofline.png
dashboard-communication-ddp-2gpu.png dashboard-communication.png
dashboard-memory-kv-snapshot.png dashboard-memory.png
dashboard-compare.png dashboard-compare.png
report-decode-top.png report.png
LIST
ls -l docs/img
