"""`grpokit report RUN_DIR`: one self-contained report.html, checked on a crafted run directory (nulls, no kl,
hostile text), on a real tiny run through the CLI, and rendered in headless Chromium with the network cut off."""

import argparse
import html
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from grpokit.errors import GrpokitError
from grpokit.observe import report
from tests.conftest import run_cli, write_jsonl

EVERY_PLOT = {"plot-reward", "plot-reward-spread", "plot-length", "plot-kl", "plot-entropy", "plot-clip-ratio",
              "plot-timings", "plot-loss", "plot-eval", "plot-learning-rate"}
HOSTILE = "<script>alert(1)</script>"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag: str, attrs: dict, parent=None):
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()


class TreeBuilder(HTMLParser):
    """Just enough of an HTML tree for the checks: elements, attributes, nesting."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.current = Node("#root", {})
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.current)
        self.current.children.append(node)
        if tag not in VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):
        self.current.children.append(Node(tag, dict(attrs), self.current))

    def handle_endtag(self, tag):
        node = self.current
        while node is not self.root and node.tag != tag:
            node = node.parent
        assert node is not self.root, f"</{tag}> closes nothing"
        self.current = node.parent

    def handle_data(self, data):
        self.text.append(data)


def parse(text: str) -> TreeBuilder:
    tree = TreeBuilder()
    tree.feed(text)
    tree.close()
    assert tree.current is tree.root, f"<{tree.current.tag}> is never closed"
    return tree


def figures(tree: TreeBuilder) -> dict[str, Node]:
    return {n.attrs["id"]: n for n in tree.root.walk() if n.tag == "figure" and "plot" in n.attrs.get("class", "")}


def data_paths(figure: Node) -> list[Node]:
    """The drawn data lines: <path d=...> inside matplotlib's <g id="{plot}-series-N">."""
    prefix = figure.attrs["id"] + "-series-"
    return [p for g in figure.walk() if g.tag == "g" and g.attrs.get("id", "").startswith(prefix)
            for p in g.walk() if p.tag == "path" and p.attrs.get("d", "").strip()]


def assert_fetches_nothing(text: str, tree: TreeBuilder) -> None:
    """No element, attribute or style in the page that makes a browser ask for anything."""
    for node in tree.root.walk():
        assert node.tag not in {"script", "link", "img", "iframe", "object", "embed", "base", "audio", "video",
                                "source", "image", "use"} or all(
            v.startswith("#") for k, v in node.attrs.items() if k.endswith("href")), f"<{node.tag} {node.attrs}>"
        for name, value in node.attrs.items():
            assert name not in ("src", "srcset", "action", "poster", "background"), f"<{node.tag} {name}={value}>"
            if name.endswith("href"):
                assert (value or "").startswith("#"), f"<{node.tag} {name}={value}>: only in-page links"
            if name == "style" or name == "clip-path":
                assert "url(" not in (value or "").replace("url(#", ""), f"<{node.tag} {name}={value}>"
    assert "@import" not in text and "@font-face" not in text
    assert "url(" not in text.replace("url(#", "")
    csp = [n.attrs.get("content", "") for n in tree.root.walk()
           if n.tag == "meta" and n.attrs.get("http-equiv", "").lower() == "content-security-policy"]
    assert csp and "default-src 'none'" in csp[0]


def train_line(step: int, **changes) -> dict:
    line = {"step": step, "reward": 0.1 * step, "reward_std": 0.2, "rewards/acc/mean": 0.05 * step,
            "rewards/acc/std": 0.1, "rewards/format/mean": None, "rewards/format/std": None,
            "frac_reward_zero_std": 0.25, "completions/mean_length": 40.0 + step, "completions/min_length": 10.0,
            "completions/max_length": 64.0, "completions/clipped_ratio": 0.5,
            "completions/mean_terminated_length": 30.0,
            "completions/frac_identical_in_group": 0.0, "entropy": 2.0 - 0.1 * step, "clip_ratio/low_mean": 0.0,
            "clip_ratio/high_mean": 0.01, "clip_ratio/region_mean": 0.01, "loss": 0.01 * step, "grad_norm": 1.5,
            "learning_rate": 1e-5, "num_tokens": 1000.0 * step, "step_time": 2.0, "time/generate": 1.2,
            "time/rewards": 0.1, "time/logprobs": 0.3, "time/update": 0.4, "time/reward/acc": 0.05,
            "tokens_per_second": 500.0, "skipped_step": 0.0}
    line.update(changes)
    return line


@pytest.fixture
def crafted_run(tmp_path) -> Path:
    """A run directory written by hand: beta 0 (no kl), nulls, an eval, a hostile completion, an alert."""
    run = tmp_path / "run"
    (run / "completions").mkdir(parents=True)
    config = {"model": "tiny/model-<b>bold</b>", "max_steps": 6, "beta": 0.0, "system_prompt": "Answer & <stop>"}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [{"step": 0, "eval/accuracy": 0.1, "eval/num_correct": 1.0, "eval/num_prompts": 10.0, "eval/time": 3.0,
              "eval/rewards/acc/mean": 0.1, "eval/completions/mean_length": 50.0,
              "eval/completions/clipped_ratio": 0.3}]
    lines += [train_line(s, **({"entropy": None} if s == 2 else {"grad_norm": None} if s == 3 else {}))
              for s in range(1, 7)]
    lines.append({**lines[0], "step": 6, "eval/accuracy": 0.4})
    write_jsonl(run / "metrics.jsonl", lines)
    long = "word " * 200
    rows = [{"step": 6, "prompt": [{"role": "user", "content": "What is 2 + 2?"}], "completion": HOSTILE,
             "rewards": {"acc": 1.0, "format": None}, "total_reward": 1.0, "advantage": 0.5, "finish_reason": "stop"},
            {"step": 6, "prompt": "plain prompt", "completion": long, "rewards": {"acc": 0.0, "format": None},
             "total_reward": 0.0, "advantage": -0.5, "finish_reason": "length"}]
    write_jsonl(run / "completions" / "step_3.jsonl", [{**rows[0], "completion": "an older step", "step": 3}])
    write_jsonl(run / "completions" / "step_6.jsonl", rows)
    write_jsonl(run / "alerts.jsonl", [{"name": "truncated_completions", "step": 4,
                                        "message": "clipped_ratio 0.5 > 0.3 <over>", "causes": "max_completion_length "
                                        "too small", "fix": "raise max_completion_length"}])
    write_jsonl(run / "reward_errors.jsonl", [{"reward": "acc", "step": 2, "kind": "exception",
                                               "error": "ValueError: x", "traceback": "", "prompt": "p",
                                               "completion": "c", "row": {}}] * 3)
    (run / "training_log.txt").write_text("2026-01-02 03:04:05,000 INFO grpokit.train.trainer: step 1/6\n"
                                          "2026-01-02 03:09:00,000 INFO grpokit.train.trainer: saved run/final_model\n")
    return run


def test_crafted_run_has_every_plot_but_kl_and_escapes_user_text(crafted_run):
    path = report.build_report(crafted_run)
    assert path == crafted_run / "report.html"
    text = path.read_text()
    tree = parse(text)

    found = figures(tree)
    assert set(found) == EVERY_PLOT - {"plot-kl"}
    for plot_id, figure in found.items():
        (svg,) = [n for n in figure.walk() if n.tag == "svg"]
        assert sum(n.tag == "path" for n in svg.walk()) > 5, plot_id
        assert data_paths(figure), f"{plot_id}: no data line drawn"
    reward_lines = {g.attrs["id"] for g in found["plot-reward"].walk() if "-series-" in g.attrs.get("id", "")}
    assert reward_lines == {"plot-reward-series-0", "plot-reward-series-1"}  # reward, acc; format is all null
    assert len(data_paths(found["plot-eval"])) >= 3  # accuracy, eval acc mean, length, clipped ratio
    assert "beta &gt; 0" in text and 'data-plot="plot-kl"' in text

    assert_fetches_nothing(text, tree)
    assert "http://" not in text and "https://" not in text
    assert not [n for n in tree.root.walk() if n.tag == "script"]
    assert html.escape(HOSTILE) in text and HOSTILE not in text
    assert "word " * 40 in text and "(1,000 characters)" in text  # the long completion, shortened and in full
    assert "an older step" not in text  # only the last logged step's completions
    assert "user: What is 2 + 2?" in text and "stop" in text and "length" in text
    assert "tiny/model-&lt;b&gt;bold&lt;/b&gt;" in text and "system_prompt: Answer &amp; &lt;stop&gt;" in text
    assert "truncated_completions" in text and "raise max_completion_length" in text and "&lt;over&gt;" in text
    assert "max_completion_length too small" in text
    assert "3 failure(s) in reward_errors.jsonl" in text and "ValueError: x" in text
    assert "2026-01-02 03:04:05" in text and "2026-01-02 03:09:00" in text and ">6 of 6<" in text


def test_missing_metrics_file_is_a_clear_error(tmp_path):
    (tmp_path / "config.yaml").write_text("model: x\n")
    with pytest.raises(GrpokitError, match="metrics.jsonl"):
        report.build_report(tmp_path)
    assert not (tmp_path / "report.html").exists()
    with pytest.raises(GrpokitError, match="does not exist"):
        report.build_report(tmp_path / "nowhere")


def test_a_bare_run_gives_notes_not_a_crash(tmp_path):
    """One step, every value null, a half-written last line, no config, no completions, no alerts."""
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": None, "loss": None})
                                            + '\n{"step": 2, "rew')
    text = report.build_report(tmp_path, tmp_path / "out" / "r.html").read_text()
    tree = parse(text)
    assert figures(tree) == {}
    for plot_id in EVERY_PLOT:
        assert f'data-plot="{plot_id}"' in text
    assert "no completion logs" in text and "no health alerts" in text and "no config.yaml" in text
    assert "metrics.jsonl line 2 is not JSON" in text
    assert_fetches_nothing(text, tree)


REWARDS = '''
def text_hash_reward(completions, **kwargs):
    return [sum(i * ord(ch) for i, ch in enumerate(c, 1)) % 997 / 997 for c in completions]
'''


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, tiny_model_dir) -> Path:
    """3 steps of real training on the tiny model through the CLI, with evaluation and completion logs."""
    root = tmp_path_factory.mktemp("report-run")
    write_jsonl(root / "train.jsonl", [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)}
                                       for a in range(5) for b in range(4)])
    write_jsonl(root / "held.jsonl", [{"prompt": f"What is {a} plus {b}?", "answer": str(a + b)}
                                      for a, b in ((1, 2), (3, 4), (5, 6))])
    (root / "my_rewards.py").write_text(REWARDS)
    config = {"model": str(tiny_model_dir), "dataset": "train.jsonl", "eval_dataset": "held.jsonl",
              "eval_on_start": True, "output_dir": "run",
              "reward_funcs": ["my_rewards.text_hash_reward", "number_correct"],
              "num_generations": 4, "per_device_train_batch_size": 4, "max_completion_length": 12,
              "learning_rate": 1e-2, "max_steps": 3, "beta": 0.1, "seed": 1, "device": "cpu",
              "log_completions_steps": 1}
    (root / "cfg.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("train", "cfg.yaml", cwd=root)
    assert result.returncode == 0, result.stderr + result.stdout
    return root / "run"


def test_report_of_a_real_run(real_run, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    out = tmp_path / "elsewhere" / "r.html"
    assert report.main(parser.parse_args([str(real_run), "--output", str(out)])) == 0
    assert capsys.readouterr().out.strip() == str(out)
    text = out.read_text()
    tree = parse(text)
    found = figures(tree)
    assert set(found) == EVERY_PLOT  # beta 0.1: kl; eval_dataset: the eval plot
    for plot_id, figure in found.items():
        assert data_paths(figure), f"{plot_id}: no data line drawn"
    reward_lines = [g for g in found["plot-reward"].walk() if "-series-" in g.attrs.get("id", "")]
    assert len(reward_lines) == 3  # reward and both reward functions
    assert_fetches_nothing(text, tree)
    assert html.escape((real_run / "config.yaml").read_text()) in text
    logs = sorted((real_run / "completions").glob("step_*.jsonl")) if (real_run / "completions").is_dir() else []
    if logs:  # completions/step_N.jsonl: the last step's completions are in the table
        last = max(logs, key=lambda p: int(p.stem.removeprefix("step_")))
        first = json.loads(last.read_text().splitlines()[0])
        assert html.escape(first["completion"][:report.TEXT_PREVIEW]) in text
    else:
        assert "no completion logs" in text
    print(f"report.html of the tiny run: {len(text.encode()):,} bytes")


def test_report_command_through_the_cli(real_run):
    result = run_cli("report", str(real_run), cwd=real_run.parent)
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stdout.strip().endswith("report.html")
    assert set(figures(parse((real_run / "report.html").read_text()))) == EVERY_PLOT


def _chromium(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    assert browser and driver_path, ("headless Chromium is needed: the Debian packages `chromium` and "
                                     "`chromium-driver` (`make test` installs them when missing)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,2400", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost",
                 "--proxy-server=127.0.0.1:9", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-default-apps",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    # an explicit driver path: Selenium Manager (which would go to the network) is never run
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=options)


def test_report_renders_in_headless_chromium_without_network(real_run, tmp_path):
    from PIL import Image
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    page = report.build_report(real_run, tmp_path / "report.html")
    driver = _chromium(tmp_path)
    try:
        driver.get(page.resolve().as_uri())
        # once in a full-suite run the query below missed the last figure (plot-learning-rate), which the HTML had;
        # not reproduced since, so wait for a complete document with every figure before measuring
        try:
            WebDriverWait(driver, 60).until(lambda d: d.execute_script(
                "return document.readyState === 'complete' && document.querySelectorAll('figure.plot').length")
                >= len(EVERY_PLOT))
        except TimeoutException:
            pass  # the assertions below say which figures are missing
        boxes = driver.execute_script("""
            return Array.from(document.querySelectorAll('figure.plot')).map(f => {
                const svg = f.querySelector('svg'); const r = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
                const lines = Array.from(f.querySelectorAll('g[id^="' + f.id + '-series-"] path'))
                    .filter(p => p.getTotalLength() > 0 || p.getBBox().width > 0);
                return {id: f.id, width: r.width, height: r.height, paths: f.querySelectorAll('svg path').length,
                        lines: lines.length};
            });""")
        resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
        requests = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
        console = driver.get_log("browser")
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()

    assert {b["id"] for b in boxes} == EVERY_PLOT
    for box in boxes:
        assert box["width"] > 100 and box["height"] > 50 and box["paths"] > 5 and box["lines"] > 0, box
    assert resources == []
    sent = [m["params"] for m in requests if m["method"] == "Network.requestWillBeSent"]
    from_report = {p["request"]["url"] for p in sent if p.get("documentURL") == page.resolve().as_uri()}
    assert from_report == {page.resolve().as_uri()}, f"the report asked for more than itself: {from_report}"
    # the whole browser (its start page included: chrome:// resources are built in) used no network scheme
    network = {p["request"]["url"] for p in sent if p["request"]["url"].split(":")[0] in ("http", "https", "ws", "wss")}
    assert not network, network
    assert not [c for c in console
                if any(word in c["message"] for word in ("Security Policy", "Refused", "Failed to load"))]
    assert shot.stat().st_size > 10_000
    image = Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
    assert image.size[0] > 500 and image.size[1] > 500
    colours = image.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20, "the screenshot is (nearly) one colour"
