"""HTML rendering: an article wrapped in one of three site layouts with lots of chrome.

Navigation, sidebar, related links, share buttons, footer and a cookie banner
surround every article, so that extraction has real boilerplate to remove.
"""

from __future__ import annotations

import html
from datetime import timedelta
from random import Random

from kiln.demo.crawl import CRAWL_START
from kiln.demo.pages import FILLER_HEADLINES, TAGS, Page, Site, slugify
from kiln.demo.sources import word_count


def _esc(text: str) -> str:
    return html.escape(text, quote=False)


def _attr(text: str) -> str:
    return html.escape(text, quote=True)


def _block_text(blocks: list) -> str:
    """Plain text of an article's prose blocks (for descriptions / counts)."""
    out = []
    for tag, payload in blocks:
        if tag in ("p", "h2", "h3"):
            out.append(payload)
        elif tag == "ul":
            out.extend(payload)
    return " ".join(out)


COOKIE_TEXTS = (
    "This website uses cookies to ensure you get the best experience on our website.",
    "This website uses cookies to improve your experience. By continuing to browse the "
    "site you agree to our use of cookies.",
    "This website uses cookies for analytics and personalised content. You can change "
    "your preferences at any time.",
)
NAV_GROUPS = (
    ("Home", ()),
    ("Articles", ("Latest", "Popular", "Editor's picks", "Archive")),
    ("Topics", ("Python", "Data", "Web", "DevOps", "Security")),
    ("Guides", ("Getting started", "Cheat sheets", "Reference", "Videos")),
    ("Community", ("Forum", "Events", "Meetups", "Code of conduct")),
    ("Resources", ("Downloads", "Books", "Podcasts", "Newsletter")),
    ("About", ("Team", "Careers", "Press", "Contact")),
)
FOOTER_COLUMNS = (
    ("Company", ("About us", "Careers", "Press", "Advertise", "Contact")),
    ("Resources", ("Blog", "Documentation", "Tutorials", "Newsletter", "RSS feed")),
    ("Legal", ("Privacy Policy", "Terms of Service", "Cookie Settings", "Imprint", "Accessibility")),
    ("Follow us", ("Twitter", "Mastodon", "GitHub", "YouTube", "LinkedIn")),
)


def _href(label: str) -> str:
    return "/" + slugify(label, "page") + "/"


def _nav_html(site: Site, cls: str) -> str:
    items = []
    for label, subs in NAV_GROUPS:
        sub = "".join(f'<li><a href="{_href(label)}{slugify(s, "x")}/">{_esc(s)}</a></li>' for s in subs)
        items.append(f'<li class="menu-item"><a href="{_href(label) if label != "Home" else "/"}">'
                     f'{_esc(label)}</a>' + (f'<ul class="sub-menu">{sub}</ul>' if sub else "") + "</li>")
    for section in site.sections:
        items.append(f'<li class="menu-item"><a href="/{section}/">{_esc(section.replace("-", " ").title())}</a></li>')
    return f'<nav class="{cls}" aria-label="Main menu"><ul>{"".join(items)}</ul></nav>'


def _footer_html(site: Site, year: int) -> str:
    cols = []
    for head, links in FOOTER_COLUMNS:
        lis = "".join(f'<li><a href="{_href(x)}">{_esc(x)}</a></li>' for x in links)
        cols.append(f'<div class="footer-col"><h4>{_esc(head)}</h4><ul>{lis}</ul></div>')
    return (f'<div class="footer-columns">{"".join(cols)}</div>'
            f'<p class="copyright">&copy; {year} {_esc(site.name)}. All rights reserved. '
            f'<a href="/privacy/">Privacy Policy</a> | <a href="/terms/">Terms of Use</a> | '
            f'<a href="/sitemap.xml">Sitemap</a></p>')


def _sidebar_html(rng: Random) -> str:
    heads = rng.sample(FILLER_HEADLINES, 6)
    popular = "".join(f'<li><a href="/posts/{slugify(h, "post")}/">{_esc(h)}</a></li>' for h in heads)
    tags = " ".join(f'<a class="tag" href="/tags/{t}/">{t}</a>' for t in rng.sample(TAGS, 8))
    return (f'<div class="widget"><h3>Popular posts</h3><ul>{popular}</ul></div>'
            f'<div class="widget"><h3>Tags</h3><p class="tag-cloud">{tags}</p></div>'
            '<div class="widget newsletter"><h3>Newsletter</h3><p>Get the best articles in '
            'your inbox.</p><form action="/subscribe"><input type="email" name="email" '
            'placeholder="you@example.com"><button>Sign up</button></form></div>')


def _blocks_html(blocks: list) -> str:
    out = []
    for tag, payload in blocks:
        if tag == "p":
            out.append(f"<p>{_esc(payload)}</p>")
        elif tag in ("h2", "h3"):
            out.append(f"<{tag}>{_esc(payload)}</{tag}>")
        elif tag == "pre":
            out.append(f"<pre>{_esc(payload)}</pre>")
        elif tag == "code":
            out.append(f'<pre><code class="language-python">{_esc(payload)}</code></pre>')
        elif tag == "ul":
            out.append("<ul>" + "".join(f"<li>{_esc(i)}</li>" for i in payload) + "</ul>")
        elif tag == "links":
            out.append('<ul class="link-list">' + "".join(
                f'<li><a href="{_attr(h)}">{_esc(t)}</a></li>' for h, t in payload) + "</ul>")
        elif tag == "table":
            rows = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>"
                           for row in payload[1:])
            head = "".join(f"<th>{_esc(c)}</th>" for c in payload[0])
            out.append(f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>')
        elif tag == "raw":
            out.append(payload)
    return "\n".join(out)


def render(page: Page, rng: Random) -> str:
    """Wrap the article in one of three site layouts with lots of chrome."""
    site = page.site
    date = page.date or CRAWL_START
    published = date - timedelta(days=rng.randint(1, 400), hours=rng.randint(0, 23))
    text = _block_text(page.blocks)
    desc = " ".join(text.split()[:30])
    minutes = max(1, word_count(text) // 220)
    head_meta = []
    if page.charset_in_meta:
        head_meta.append(f'<meta http-equiv="Content-Type" content="text/html; charset={page.charset}">'
                         if site.layout == "table" else f'<meta charset="{page.charset}">')
    head_meta += [
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(page.title)} | {_esc(site.name)}</title>",
        f'<meta name="description" content="{_attr(desc)}">',
        f'<meta name="author" content="{_attr(page.author)}">' if page.author else "",
        f'<meta property="og:title" content="{_attr(page.title)}">',
        f'<meta property="og:site_name" content="{_attr(site.name)}">',
        f'<meta property="article:published_time" content="{published:%Y-%m-%dT%H:%M:%SZ}">',
        f'<link rel="canonical" href="{_attr(page.canonical or page.url)}">',
        f'<link rel="stylesheet" href="/static/css/main.{rng.getrandbits(32):08x}.css">',
    ]
    head = "\n".join(m for m in head_meta if m)
    cookie = (f'<div id="cookie-consent" class="cookie-banner"><p>{_esc(rng.choice(COOKIE_TEXTS))} '
              '<a href="/cookie-policy/">Learn more</a></p><button class="accept">Accept all</button> '
              '<button class="settings">Cookie settings</button></div>')
    byline = (f'By <a rel="author" href="/authors/{slugify(page.author, "staff")}/">{_esc(page.author)}</a> '
              f'&middot; <time datetime="{published:%Y-%m-%d}">{published:%B %d, %Y}</time> '
              f'&middot; {minutes} min read') if page.author else f'<time datetime="{published:%Y-%m-%d}">{published:%Y-%m-%d}</time>'
    section = page.section or site.sections[0]
    crumbs = (f'<a href="/">Home</a> &rsaquo; <a href="/{section}/">{_esc(section.title())}</a> '
              f'&rsaquo; <span>{_esc(page.title)}</span>')
    body = _blocks_html(page.blocks)
    sidebar = _sidebar_html(rng)
    related = "".join(f'<li><a href="/posts/{slugify(h, "post")}/">{_esc(h)}</a></li>'
                      for h in rng.sample(FILLER_HEADLINES, 4))
    share = ('<div class="share">Share this: <a href="#">Twitter</a> <a href="#">Facebook</a> '
             '<a href="#">LinkedIn</a> <a href="#">Email</a></div>')
    footer = _footer_html(site, date.year)
    lang = page.lang.split("_")[0]

    if site.layout == "semantic":
        page_html = f"""<!DOCTYPE html>
<html lang="{lang}">
<head>
{head}
</head>
<body class="page-article">
{cookie}
<header class="site-header"><a class="logo" href="/">{_esc(site.name)}</a><p class="tagline">{_esc(site.tagline)}</p>
{_nav_html(site, "main-nav")}
<form class="search" action="/search" role="search"><input type="search" name="q" placeholder="Search"><button>Search</button></form>
</header>
<div class="breadcrumbs">{crumbs}</div>
<div class="layout">
<main id="main-content">
<article class="post">
<h1 class="entry-title">{_esc(page.title)}</h1>
<p class="byline">{byline}</p>
<div class="entry-content">
{body}
</div>
{share}
</article>
<section class="related"><h3>Related articles</h3><ul>{related}</ul></section>
</main>
<aside class="sidebar">{sidebar}</aside>
</div>
<footer class="site-footer">{footer}</footer>
<script src="/static/js/app.js" defer></script>
</body>
</html>
"""
    elif site.layout == "divs":
        page_html = f"""<!DOCTYPE html>
<html lang="{lang}">
<head>
{head}
</head>
<body>
<div id="wrapper">
<div id="header"><div class="logo"><a href="/">{_esc(site.name)}</a></div><div class="slogan">{_esc(site.tagline)}</div></div>
<div id="menu">{_nav_html(site, "menu")}</div>
<div id="container">
<div id="content">
<div class="post">
<h1 class="post-title">{_esc(page.title)}</h1>
<div class="post-meta">{byline} | <a href="/{section}/">{_esc(section)}</a></div>
<div class="post-content">
{body}
</div>
{share}
</div>
<div id="comments"><h3>Leave a comment</h3><form action="/comment"><textarea name="c"></textarea><button>Post comment</button></form></div>
<div class="related-posts"><h3>You might also like</h3><ul>{related}</ul></div>
</div>
<div id="sidebar">{sidebar}</div>
</div>
<div id="footer">{footer}</div>
</div>
{cookie}
</body>
</html>
"""
    else:  # "table": an old-school layout (also used by the non-UTF-8 pages)
        page_html = f"""<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 4.01 Transitional//EN">
<html lang="{lang}">
<head>
{head}
</head>
<body bgcolor="#ffffff">
<table width="100%" cellpadding="4" class="top"><tr><td class="logo"><a href="/">{_esc(site.name)}</a></td><td class="slogan">{_esc(site.tagline)}</td></tr></table>
{cookie}
<table width="100%" class="main"><tr>
<td valign="top" width="200" class="navcol">{_nav_html(site, "leftnav")}{sidebar}</td>
<td valign="top" class="content">
<div class="crumbs">{crumbs}</div>
<h1>{_esc(page.title)}</h1>
<div class="postinfo">{byline}</div>
<div class="postbody">
{body}
</div>
<div class="related"><b>Related:</b><ul>{related}</ul></div>
</td></tr></table>
<div class="footer">{footer}</div>
</body>
</html>
"""
    return page_html
