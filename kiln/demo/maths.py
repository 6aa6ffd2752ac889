"""Maths lessons for the demo crawl: module reference text plus worked examples.

Every example is computed, not copied: the numbers come from the page's
``random.Random`` and the results from the standard library, so a lesson's
arithmetic is right and no two lessons repeat the same figures.
"""

from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from random import Random

from kiln.demo.pages import TARGETS, Page, pick_site
from kiln.demo.sources import MATH_MODULES, doc_blocks


def _fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}".rstrip("0").rstrip(".")


def _ex_variance(r: Random) -> tuple[str, list[str]]:
    xs = [r.randint(1, 30) for _ in range(r.randint(5, 8))]
    n, total = len(xs), sum(xs)
    mu = Fraction(total, n)
    sq = [(x - mu) ** 2 for x in xs]
    ss = sum(sq)
    var = ss / n
    return "Variance and standard deviation", [
        f"Consider the data set x = ({', '.join(map(str, xs))}). Its mean is "
        f"μ = ({' + '.join(map(str, xs))})/{n} = {total}/{n} ≈ {_fmt(float(mu))}.",
        f"The squared deviations (x − μ)² are {', '.join(_fmt(float(s), 3) for s in sq)}, so their "
        f"sum is Σ(x − μ)² ≈ {_fmt(float(ss), 3)}. The population variance is therefore "
        f"σ² = Σ(x − μ)²/n ≈ {_fmt(float(ss), 3)}/{n} ≈ {_fmt(float(var))}, and the standard "
        f"deviation is σ = √σ² ≈ {_fmt(math.sqrt(var))}.",
        f"In LaTeX notation the formula reads \\sigma^2 = \\frac{{1}}{{n}}\\sum_{{i=1}}^{{n}}(x_i - \\mu)^2. "
        f"Dividing by n − 1 = {n - 1} instead gives the sample variance s² ≈ {_fmt(float(ss / (n - 1)))}, "
        f"which is what statistics.variance() returns.",
    ]


def _ex_regression(r: Random) -> tuple[str, list[str]]:
    slope, icept = r.randint(1, 5), r.randint(-5, 10)
    xs = list(range(1, r.randint(5, 7) + 1))
    ys = [slope * x + icept + r.choice((-2, -1, 0, 1, 2)) for x in xs]
    n = len(xs)
    mx, my = Fraction(sum(xs), n), Fraction(sum(ys), n)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sxy / sxx
    a = my - b * mx
    pts = ", ".join(f"({x}, {y})" for x, y in zip(xs, ys))
    return "Fitting a straight line by least squares", [
        f"Given the points {pts}, we look for the line y = a + bx that minimises the sum of "
        f"squared residuals. The means are x̄ = {_fmt(float(mx))} and ȳ = {_fmt(float(my))}.",
        f"The slope is b = Σ(x − x̄)(y − ȳ) / Σ(x − x̄)² = {_fmt(float(sxy))} / {_fmt(float(sxx))} "
        f"≈ {_fmt(float(b))}, and the intercept is a = ȳ − b·x̄ ≈ {_fmt(float(a))}.",
        f"So the fitted line is y ≈ {_fmt(float(a))} + {_fmt(float(b))}x; at x = {n + 1} it predicts "
        f"y ≈ {_fmt(float(a + b * (n + 1)))}. This is what statistics.linear_regression() computes.",
    ]


def _ex_quadratic(r: Random) -> tuple[str, list[str]]:
    r1, r2, a = r.randint(-9, 9), r.randint(-9, 9), r.randint(1, 3)
    b, c = -a * (r1 + r2), a * r1 * r2
    disc = b * b - 4 * a * c
    lo, hi = sorted((r1, r2))
    return "Solving a quadratic equation", [
        f"Solve {a}x² {'+' if b >= 0 else '−'} {abs(b)}x {'+' if c >= 0 else '−'} {abs(c)} = 0. "
        f"The quadratic formula is x = \\frac{{-b \\pm \\sqrt{{b^2 - 4ac}}}}{{2a}} with a = {a}, b = {b}, c = {c}.",
        f"First compute the discriminant Δ = b² − 4ac = {b * b} {'−' if c >= 0 else '+'} {abs(4 * a * c)} = {disc}. "
        f"Since Δ {'> 0 there are two distinct real roots' if disc > 0 else '= 0 there is one double root'}, "
        f"and √Δ = {math.isqrt(disc)}.",
        f"Hence x = ({-b} ± {math.isqrt(disc)}) / {2 * a}, which gives x₁ = {lo} and x₂ = {hi}. "
        f"Check: {a}·({lo})² + ({b})·({lo}) + ({c}) = {a * lo * lo + b * lo + c}.",
    ]


def _ex_fraction(r: Random) -> tuple[str, list[str]]:
    a, b, c, d = r.randint(1, 9), r.randint(2, 12), r.randint(1, 9), r.randint(2, 12)
    num, den = a * d + b * c, b * d
    res = Fraction(a, b) + Fraction(c, d)
    g = math.gcd(num, den)
    return "Adding fractions", [
        f"To add \\frac{{{a}}}{{{b}}} + \\frac{{{c}}}{{{d}}}, bring both terms to the common "
        f"denominator {b}·{d} = {den}: the sum is ({a}·{d} + {c}·{b}) / {den} = {num}/{den}.",
        f"The greatest common divisor of {num} and {den} is {g}, so the result simplifies to "
        f"{res.numerator}/{res.denominator}" + (f" ≈ {_fmt(float(res))}." if res.denominator != 1 else "."),
        f"In Python, Fraction({a}, {b}) + Fraction({c}, {d}) returns Fraction({res.numerator}, "
        f"{res.denominator}) exactly, without any rounding error.",
    ]


def _ex_gcd(r: Random) -> tuple[str, list[str]]:
    g = r.randint(2, 30)
    x, y = g * r.randint(10, 60), g * r.randint(3, 40)
    a, b = max(x, y), min(x, y)
    steps = []
    while b:
        q, rem = divmod(a, b)
        steps.append(f"{a} = {q}·{b} + {rem}")
        a, b = b, rem
    return "The Euclidean algorithm", [
        f"We compute gcd({max(x, y)}, {min(x, y)}) by repeated division with remainder: "
        + "; ".join(steps) + ".",
        f"The last non-zero remainder is {a}, so gcd({x}, {y}) = {a} and the least common "
        f"multiple is lcm = {x}·{y}/{a} = {x * y // a}.",
    ]


def _ex_interest(r: Random) -> tuple[str, list[str]]:
    principal = Decimal(r.randrange(1000, 20001, 500))
    rate = Decimal(r.randrange(15, 80, 5)) / 10
    years = r.randint(2, 15)
    n = 12
    factor = (1 + rate / 100 / n) ** (n * years)
    amount = (principal * factor).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    return "Compound interest with exact decimals", [
        f"An amount P = {principal} is invested at an annual rate of r = {rate}% compounded "
        f"monthly (n = {n}) for t = {years} years. The formula is A = P(1 + r/n)^{{nt}}.",
        f"Here nt = {n * years} and 1 + r/n = 1 + {rate / 100}/{n} ≈ {_fmt(float(1 + rate / 100 / n), 6)}, "
        f"so A ≈ {principal} × {_fmt(float(factor), 6)} = {amount}.",
        f"The interest earned is A − P = {amount - principal}. Using decimal.Decimal and "
        f"quantize(Decimal('0.01'), rounding=ROUND_HALF_UP) keeps the cents exact.",
    ]


def _ex_series(r: Random) -> tuple[str, list[str]]:
    a1, d, n = r.randint(1, 20), r.randint(2, 9), r.randint(10, 60)
    an = a1 + (n - 1) * d
    return "Sum of an arithmetic series", [
        f"The sequence {a1}, {a1 + d}, {a1 + 2 * d}, … has first term a₁ = {a1} and common "
        f"difference d = {d}. Its {n}th term is aₙ = a₁ + (n − 1)d = {a1} + {n - 1}·{d} = {an}.",
        f"The sum of the first {n} terms is S_n = \\frac{{n(a_1 + a_n)}}{{2}} = {n}·({a1} + {an})/2 "
        f"= {n * (a1 + an) // 2 if n * (a1 + an) % 2 == 0 else _fmt(n * (a1 + an) / 2)}.",
    ]


def _ex_pythagoras(r: Random) -> tuple[str, list[str]]:
    a, b = r.randint(2, 40), r.randint(2, 40)
    c2 = a * a + b * b
    return "The Pythagorean theorem", [
        f"A right triangle has legs a = {a} and b = {b}. By Pythagoras, c² = a² + b² = "
        f"{a * a} + {b * b} = {c2}.",
        f"Therefore the hypotenuse is c = √{c2} ≈ {_fmt(math.sqrt(c2))}; math.hypot({a}, {b}) "
        f"gives the same value. The angle opposite a is atan({a}/{b}) ≈ "
        f"{_fmt(math.degrees(math.atan2(a, b)), 2)}°.",
    ]


def _ex_binomial(r: Random) -> tuple[str, list[str]]:
    n = r.randint(5, 16)
    k = r.randint(1, n - 1)
    comb = math.comb(n, k)
    return "Counting with binomial coefficients", [
        f"The number of ways to choose k = {k} items from n = {n} is C(n, k) = "
        f"\\frac{{n!}}{{k!(n-k)!}} = {n}!/({k}!·{n - k}!) = {comb}.",
        f"If a fair coin is tossed {n} times, the probability of exactly {k} heads is "
        f"C({n}, {k})/2^{n} = {comb}/{2 ** n} ≈ {_fmt(comb / 2 ** n, 5)}.",
    ]


def _ex_derivative(r: Random) -> tuple[str, list[str]]:
    coeffs = [r.randint(-6, 6) or 1 for _ in range(r.randint(3, 5))]  # highest power first

    def poly(cs: list[int]) -> str:
        deg = len(cs) - 1
        terms = []
        for i, cf in enumerate(cs):
            p = deg - i
            if cf == 0:
                continue
            var = "" if p == 0 else ("x" if p == 1 else f"x^{p}")
            terms.append(f"{cf}{var}")
        return " + ".join(terms).replace("+ -", "− ")

    deriv = [cf * (len(coeffs) - 1 - i) for i, cf in enumerate(coeffs[:-1])]
    x0 = r.randint(-3, 3)
    slope = sum(cf * x0 ** (len(deriv) - 1 - i) for i, cf in enumerate(deriv))
    return "Differentiating a polynomial", [
        f"Let f(x) = {poly(coeffs)}. By the power rule \\frac{{d}}{{dx}} x^n = n x^{{n-1}}, "
        f"the derivative is f'(x) = {poly(deriv)}.",
        f"At x = {x0} the slope of the tangent line is f'({x0}) = {slope}.",
    ]


def _ex_modpow(r: Random) -> tuple[str, list[str]]:
    base, exp, mod = r.randint(2, 12), r.randint(10, 40), r.choice((7, 11, 13, 17, 19, 23, 29))
    steps, sq, e, bits = [], base % mod, exp, []
    k = 0
    while e:
        if e & 1:
            bits.append(f"{base}^{2 ** k} ≡ {sq}")
        steps.append(f"{base}^{2 ** k} ≡ {sq} (mod {mod})")
        sq = sq * sq % mod
        e >>= 1
        k += 1
    return "Modular exponentiation by repeated squaring", [
        f"To compute {base}^{exp} mod {mod}, write {exp} in binary as {exp:b} and square repeatedly: "
        + "; ".join(steps) + ".",
        f"Multiplying the powers that correspond to 1-bits ({', '.join(bits)}) gives "
        f"{base}^{exp} ≡ {pow(base, exp, mod)} (mod {mod}), matching pow({base}, {exp}, {mod}).",
    ]


def _ex_complex(r: Random) -> tuple[str, list[str]]:
    a, b = r.randint(-9, 9) or 1, r.randint(-9, 9) or 2
    z = complex(a, b)
    mod_z, arg = abs(z), math.atan2(b, a)
    return "Complex numbers in polar form", [
        f"Take z = {a} {'+' if b >= 0 else '−'} {abs(b)}i. Its modulus is |z| = √(a² + b²) = "
        f"√({a * a} + {b * b}) = √{a * a + b * b} ≈ {_fmt(mod_z)}.",
        f"Its argument is φ = atan2({b}, {a}) ≈ {_fmt(arg)} rad, so z = r·e^{{iφ}} ≈ "
        f"{_fmt(mod_z)}·(cos {_fmt(arg, 3)} + i sin {_fmt(arg, 3)}); cmath.polar(z) returns "
        f"({_fmt(mod_z)}, {_fmt(arg)}).",
        f"Its square is z² = {int((z * z).real)} {'+' if (z * z).imag >= 0 else '−'} "
        f"{abs(int((z * z).imag))}i and its conjugate is z̄ = {a} {'−' if b >= 0 else '+'} {abs(b)}i.",
    ]


def _ex_dice(r: Random) -> tuple[str, list[str]]:
    s = r.randint(3, 11)
    ways = [(i, s - i) for i in range(1, 7) if 1 <= s - i <= 6]
    p = Fraction(len(ways), 36)
    return "Probability with two dice", [
        f"When two fair dice are rolled there are 6 × 6 = 36 equally likely outcomes. The sum "
        f"{s} occurs for {', '.join(f'({x}, {y})' for x, y in ways)}, i.e. {len(ways)} outcomes.",
        f"Hence P(sum = {s}) = {len(ways)}/36 = {p.numerator}/{p.denominator} ≈ {_fmt(float(p))}. "
        f"Simulating 10,000 rolls with random.randint(1, 6) gives a relative frequency close to this value.",
    ]


def _ex_log(r: Random) -> tuple[str, list[str]]:
    base = r.choice((2, 3, 5, 10))
    x = base ** r.randint(3, 9)
    y = r.randint(20, 5000)
    return "Logarithms and change of base", [
        f"Since {base}^{round(math.log(x, base))} = {x}, we have log_{base}({x}) = "
        f"{round(math.log(x, base))}. In general \\log_b(x) = \\frac{{\\ln x}}{{\\ln b}}.",
        f"For a value that is not an exact power, log_{base}({y}) = ln({y})/ln({base}) ≈ "
        f"{_fmt(math.log(y))}/{_fmt(math.log(base))} ≈ {_fmt(math.log(y, base))}.",
    ]


MATH_EXAMPLES = {
    "statistics": (_ex_variance, _ex_regression, _ex_dice),
    "fractions": (_ex_fraction, _ex_gcd, _ex_series),
    "decimal": (_ex_interest, _ex_fraction, _ex_series),
    "math": (_ex_quadratic, _ex_pythagoras, _ex_binomial, _ex_derivative, _ex_log, _ex_modpow),
    "cmath": (_ex_complex, _ex_quadratic, _ex_log),
    "random": (_ex_dice, _ex_binomial, _ex_variance),
}
MATH_TITLES = ("{topic}: worked examples", "Step by step: {topic}", "Lesson {n}: {topic}",
               "{topic} with Python's {mod} module", "Practice problems on {topic}")


def math_pages(docs: dict[str, list[tuple[str, str]]], rng: Random) -> list[Page]:
    """Kind 3: maths reference prose + generated worked examples."""
    mods = [m for m in MATH_MODULES if docs.get(m)]
    pages = []
    for i in range(TARGETS["math"] if mods else 0):
        mod = mods[i % len(mods)]
        gens = MATH_EXAMPLES[mod]
        chosen = [rng.choice(gens) for _ in range(rng.randint(3, 4))]
        examples = [g(rng) for g in chosen]
        topic = examples[0][0]
        title = rng.choice(MATH_TITLES).format(topic=topic, n=i + 1, mod=mod)
        entries = rng.sample(docs[mod], min(len(docs[mod]), rng.randint(3, 6)))
        blocks: list = [("p", f"This lesson uses the {mod} module to check every result. "
                              f"We start with the reference documentation of the functions involved.")]
        if mod in ("math", "cmath"):  # short one-line docs: render as a list
            blocks.append(("ul", [f"{name}: {doc}" for name, doc in entries]))
        else:
            for name, doc in entries[:3]:
                blocks.append(("h3", name))
                blocks.extend(doc_blocks(doc)[:4])
        for k, (heading, paras) in enumerate(examples, 1):
            blocks.append(("h2", f"Example {k}: {heading}"))
            blocks.extend(("p", p) for p in paras)
        site = pick_site(rng, (("math", 4), ("blog", 1), ("wiki", 1)))
        pages.append(Page("math", title, blocks, site, section=rng.choice(site.sections)))
    return pages
