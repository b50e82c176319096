# policy report tests render the HTML page in a real headless Chromium (tests/test_policy_report.py)
apt_need chromium:chromium
