"""The browser fixture itself: it loads a page, keeps a screenshot and sees the console."""

from __future__ import annotations

from browser import PHONE, Browser


def test_a_page_is_drawn_and_its_errors_are_seen(tmp_path, monkeypatch):
    monkeypatch.setenv("FIELDGATE_ARTIFACTS", str(tmp_path))
    page = tmp_path / "p.html"
    page.write_text(
        '<meta name="viewport" content="width=device-width"><title>t</title>'
        "<h1>fieldgate</h1><script>console.error('boom')</script>"
    )
    b = Browser("fixture")
    try:
        b.get(page.as_uri())
        assert b.driver.title == "t"
        assert b.driver.execute_script("return window.innerWidth") == PHONE[0]
        shot = b.shot("page")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert any("boom" in e for e in b.js_errors())
    finally:
        b.quit()
