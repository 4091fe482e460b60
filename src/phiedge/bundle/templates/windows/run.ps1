# run.ps1: run this bundle's Phi model with ONNX Runtime GenAI on Windows: a DirectX 12 GPU (DirectML) or, on a
# Windows on Arm PC, the Snapdragon NPU (QNN), as the bundle's requirements.txt says.
#   .\run.ps1 -Prompt "Write a haiku about edge devices" [-MaxLength 256] [more generate.py options]
# The first run creates .venv next to this script and installs requirements.txt
# (onnxruntime-genai-directml; or onnxruntime-genai and onnxruntime-qnn, whose QNN provider generate.py registers).
# Needs 64-bit Python 3.11 or newer from python.org (ARM64 on Windows on Arm). If scripts are blocked, start it with:
#   powershell -ExecutionPolicy Bypass -File .\run.ps1 -Prompt "..."
# -MaxLength is the number of new tokens (generate.py --max-new-tokens). Extra options, e.g. --chat or
# --temperature 0.7, go through to generate.py unchanged.
param(
    [string]$Prompt,
    [int]$MaxLength = 256
)
$ErrorActionPreference = 'Stop'
$venv = Join-Path $PSScriptRoot '.venv'
$python = Join-Path $venv 'Scripts\python.exe'
if (-not (Test-Path $python)) {
    if (Get-Command py -ErrorAction SilentlyContinue) { & py -3 -m venv $venv } else { & python -m venv $venv }
    if ($LASTEXITCODE -ne 0 -or -not (Test-Path $python)) { throw 'Could not create .venv: install Python 3.11+ (64-bit).' }
    & $python -c 'import sys; sys.exit(sys.version_info < (3, 11) or sys.maxsize <= 2**32)'
    if ($LASTEXITCODE -ne 0) { Remove-Item -Recurse -Force $venv; throw 'Python 3.11+ (64-bit) is required.' }
    & $python -m pip install --disable-pip-version-check -r (Join-Path $PSScriptRoot 'requirements.txt')
    if ($LASTEXITCODE -ne 0) { Remove-Item -Recurse -Force $venv; throw 'pip install -r requirements.txt failed.' }
}
$options = @('--max-new-tokens', $MaxLength)
if ($Prompt) { $options = @('--prompt', $Prompt) + $options }
& $python (Join-Path $PSScriptRoot 'generate.py') (Join-Path $PSScriptRoot 'model') @options @args
exit $LASTEXITCODE
