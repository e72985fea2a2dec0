"""Caption metrics as the COCO caption toolkit (pycocoevalcap) computes them: BLEU-1..4, ROUGE-L and CIDEr-D, plus a
pure-Python stand-in for its Java PTB tokenizer.

Scores are raw fractions, as pycocoevalcap's ``COCOEvalCap.eval`` holds them (a perfect caption has Bleu_4 = 1.0 and
CIDEr = 10.0); LAVIS prints these same numbers. Multiply by 100 for the "percent" tables of papers. METEOR and SPICE
need Java and are not computed.

``references`` maps an image id to its reference captions, ``candidates`` maps the same ids to one generated caption.
``bleu``, ``rouge_l`` and ``cider`` take captions already tokenised (tokens joined by spaces, as pycocoevalcap's scorers
take them); ``caption_metrics`` takes raw captions and tokenises them with ``ptb_tokenize_batch`` first.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

# --------------------------------------------------------------------------------------------------------------------
# PTB tokenizer
#
# pycocoevalcap runs Stanford CoreNLP 3.4.1's PTBTokenizer (`-preserveLines -lowerCase`) on all captions joined by
# newlines, then drops the tokens in PUNCTUATIONS. Below is a longest-match lexer with the rules of that PTBLexer that
# ordinary text reaches, written from its documented behaviour and checked token for token against the jar (on tens
# of thousands of generated captions, run-together words and punctuation included, without a difference). Known
# differences, all outside ordinary captions:
#   - a '\r', '\f', '\v', U+2028 or U+2029 inside a caption: the jar takes it for a line break, which shifts every
#     later caption of the batch onto the wrong image; we treat it as a space;
#   - SGML/XML markup, URLs, e-mail addresses, phone numbers and smileys are recognised only in their common forms,
#     and the jar's file-name rule ("9x.c") is not copied;
#   - the jar's lists of symbol characters, letters of rare scripts and CP1252 control characters are not copied in
#     full: a character we do not know is deleted, as the jar deletes characters it cannot tokenise.
# Where a token's form depends on what follows it (a single letter with a period, "a." before " The ..."), the jar looks
# across the line break into the next caption of its batch; ptb_tokenize_batch does the same, ptb_tokenize sees none.
# --------------------------------------------------------------------------------------------------------------------

# pycocoevalcap's PUNCTUATIONS. "-LRB-" & co. are compared after the jar lowercased them to "-lrb-", so they never
# match: round, square and curly brackets survive tokenisation as "-lrb-", "-lsb-", "-lcb-", ... in COCO scores too.
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])

# Python's \w also takes numeric characters (superscripts, vulgar fractions, circled digits) the jar does not see as
# letters; \u00AD is a soft hyphen (removed from words) and \u0300-\u036F are combining accents
_NUMERIC = r"[\u00B2\u00B3\u00B9\u00BC-\u00BE\u2070-\u209F\u2150-\u2182\u2185-\u218F\u2460-\u24FF\u2776-\u2793]"
_LETTER = rf"(?:(?!{_NUMERIC})[^\W\d_]|[\u00AD\u0300-\u036F])"
_ALNUM = rf"(?:(?!{_NUMERIC})[^\W_])"
_APOS = r"(?:['\u0092\u2019]|&apos;)"
_APOS_ETC = r"(?:['`\u0092\u2019\u0091\u2018\u201B]|&apos;)"
_SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
_SPACE_NL = r"[ \t\u00A0\u2000-\u200A\u3000\n]"
_WORD = rf"{_LETTER}(?:{_LETTER}|\d)*(?:[.!?]{_LETTER}(?:{_LETTER}|\d)*)*"
_NUM = r"(?:\d*(?:[.:,\u00AD\u066B\u066C]\d+)+|\d+)"
_REDAUX = rf"{_APOS}(?:[msd]|re|ve|ll)"
# (?-i:[A-Za-z]): under re.IGNORECASE, [a-z] would also take the dotless i and the long s
_ACRO = r"(?:(?-i:[A-Za-z])(?:\.(?-i:[A-Za-z]))*|(?:canada|sino|korean|eu|japan|non)-u\.s|u\.s\.-(?:u\.k|u\.s\.s\.r))"
_ACRO2 = r"(?:(?-i:[A-Za-z])(?:\.(?-i:[A-Za-z]))+|(?:canada|sino|korean|eu|japan|non)-u\.s|u\.s\.-(?:u\.k|u\.s\.s\.r))"
_HYPHEN = r"[-_\u058A\u2010\u2011]"
_THING_PART = rf"(?:(?-i:[dDoOlL]){_APOS_ETC}{_ALNUM})?{_ALNUM}+"
_THING = rf"{_THING_PART}(?:{_HYPHEN}{_THING_PART})*"
_HTHING = rf"[a-z0-9][a-z0-9.,\u00AD]*(?:-(?:{_ACRO2}\.|[a-z0-9\u00AD]+))+"  # "blue-i.e.": the longer part first
_THINGA = r"(?-i:[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+)"
# Abbreviations that keep their period (checked one by one against the jar). (?-i:...) marks the jar's case-sensitive
# first letters: "Mass." is an abbreviation, "mass." a word and a period.
_ABBREV1 = ("jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu|thurs|fri"
            "|ala|ariz|(?-i:A)z|(?-i:A)rk|calif|colo|conn|ct|dak|(?-i:D)el|fla|ga|(?-i:I)ll|ind|kans?|ky|(?-i:L)a"
            "|(?-i:M)ass|md|mich|minn|(?-i:M)iss|mo|mont|neb|nev|okla|(?-i:O)re|(?-i:P)a|penn|tenn|(?-i:T)ex|va|vt"
            "|(?-i:W)ash|wisc?|wyo|inc|cos?|corp|ptys?|ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys|tel|est|ext|sq"
            "|jr|sr|bros|esq|etc|al|seq|bldg|blvd|rd")
_ABBREV2 = ("mrs?|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|capt|ste?|ave"
            "|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst|assoc|ens|insp|mlle|mme|msgr|sfc"
            "|vs|alex|wm|jos|cie|a\\.k\\.a|cf|treas|ph|invt|elec|natl|m[ft]g|dept|" + _ACRO)
_ABBREV3 = "ca|figs?|prop|nos?|art|pp|op"  # keep their period only before a number: "no. 5"
# A single letter with a period ends the sentence when one of these capitalised words follows ("... letter a. The").
_NEXT_WORD = ("(?-i:A)bout|(?-i:A)ccording|(?-i:A)dditionally|(?-i:A)fter|(?-i:A)n|(?-i:A)|(?-i:A)s|(?-i:A)t|(?-i:B)ut"
              "|(?-i:E)arlier|(?-i:H)e|(?-i:H)er|(?-i:H)ere|(?-i:H)owever|(?-i:I)f|(?-i:I)n|(?-i:I)t|(?-i:L)ast"
              "|(?-i:M)any|(?-i:M)ore|(?-i:M)r\\.|(?-i:M)s\\.|(?-i:N)ow|(?-i:O)nce|(?-i:O)ne|(?-i:O)ther|(?-i:O)ur"
              "|(?-i:S)he|(?-i:S)ince|(?-i:S)o|(?-i:S)ome|(?-i:S)uch|(?-i:T)hat|(?-i:T)he|(?-i:T)heir|(?-i:T)hen"
              "|(?-i:T)here|(?-i:T)hese|(?-i:T)hey|(?-i:T)his|(?-i:W)e|(?-i:W)hen|(?-i:W)hile|(?-i:W)hat|(?-i:Y)et"
              "|(?-i:Y)ou")
_APOWORD = (rf"{_APOS}n{_APOS}?", rf"(?-i:[lLdDjJ]){_APOS}", rf"(?:dunkin|somethin|ol){_APOS}", rf"{_APOS}em",
            rf"(?-i:[A-HJ-XZn]){_APOS_ETC}{_LETTER}{{2,}}", rf"{_APOS}(?-i:[2-9])0s", rf"{_APOS}till?",
            rf"{_LETTER}+(?-i:[aeiouyAEIOUY]){_APOS_ETC}(?-i:[aeiouA-Z]){_LETTER}*", rf"{_APOS}cause", r"cont'd\.?",
            r"nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l")
_MISC_SYMBOL = ("[\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00BA\u00D7\u00F7\u0387\u05BE\u05C0\u05C3\u05C6"
                "\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B\u061E\u066A\u066D\u0703-\u070D\u07F6-\u07F8"
                "\u0964\u0965\u0E4F\u2016\u2017\u2020-\u2023\u2030-\u2038\u203B\u203E-\u2042\u2044\u207A-\u207F"
                "\u208A-\u208E\u2100-\u214F\u2190-\u23FF\u2600-\u26FF\u3012\u30FB\uFF01-\uFF0F\uFF1A-\uFF20"
                "\uFF3B-\uFF40\uFF5B-\uFF65]")

_FRACTIONS = {"\u00BC": "1/4", "\u00BD": "1/2", "\u00BE": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_QUOTE_MAP = str.maketrans({"\u0091": "`", "\u2018": "`", "\u201B": "`", "\u2039": "`", "\u0092": "'", "\u2019": "'",
                            "\u203A": "'", "\u0093": "``", "\u201C": "``", "\u00AB": "``", "\u0094": "''",
                            "\u201D": "''", "\u00BB": "''"})
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}


def _quotes(token: str) -> str:
    return token.replace("&apos;", "'").translate(_QUOTE_MAP)


def _rule(*patterns: str, action=None, context: str = "") -> tuple[list[re.Pattern], object]:
    """A lexer rule: alternative token patterns (the longest match wins, as in JFlex; Python's `|` takes the first),
    each followed by trailing context that counts for the match length but is not consumed (JFlex's `token/context`).
    `action(token)` gives the emitted tokens and how many characters they consume; by default the token itself."""
    return [re.compile(rf"(?P<t>{pattern}){context}", re.IGNORECASE) for pattern in patterns], action


def _drop_last(n: int):
    """Emit the token without its last n characters, which are lexed again ("cannot" -> "can" "not")."""
    return lambda token: ([token[:len(token) - n]], len(token) - n)


def _acronym_at_sentence_end(token: str):
    # "a." before a sentence start is the letter and a period; a longer acronym keeps its period and adds one
    return ([token[0], "."], 2) if len(token) == 2 else ([token, "."], len(token))


def _no_soft_hyphens(token: str):
    return [token.replace("\u00AD", "")], len(token)


def _hyphens(token: str):
    return (["--" if 3 <= len(token) <= 4 else token], len(token))


def _phone(token: str):
    text = re.sub(r"[ ]", "\u00A0", token).replace("(", "-LRB-").replace(")", "-RRB-")
    return [text], len(token)


def _currency(token: str):
    return [{"\u00A2": "cents", "\u00A3": "#", "\u0080": "$", "\u00A4": "$", "\u20A0": "$", "\u20AC": "$"}.get(
        token, token)], 1


# In the jar's order: on equal match lengths the earlier rule wins.
_RULES = [
    _rule(r"c\+\+|[cf]#"),
    _rule(rf"cannot|{_APOS}twas", action=_drop_last(3)),
    _rule(rf"{_APOS}tis|gonna|gotta|lemme|gimme|wanna", action=_drop_last(2)),
    _rule(r"<(?:[!?][a-z-][^>\n]*|[a-z][a-z0-9_:.-]*(?: +(?:[a-z][a-z0-9_:.-]*|[a-z][a-z0-9_:.-]* *= *"
          r"(?:'[^'\n]*'|\"[^\"\n]*\"|[a-z][a-z0-9_:.-]*)))* */?|/[a-z][a-z0-9_:.-]*) *>",
          action=lambda t: ([t.replace(" ", "\u00A0")], len(t))),
    _rule(r"&(?:md|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", action=lambda t: (["--"], len(t))),
    _rule(r"&amp;", action=lambda t: (["&"], len(t))),
    _rule(r"&(?:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);"),
    _rule(_WORD, action=_no_soft_hyphens, context=_REDAUX),
    _rule(r"(?-i:[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*)", action=_no_soft_hyphens, context=rf"n{_APOS_ETC}t"),
    _rule(_WORD, action=_no_soft_hyphens),
    _rule(*_APOWORD),
    _rule(rf"y{_APOS}", context=_LETTER),
    _rule(r"https?://[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-]"),
    # the jar's class ",-_" is the range U+002C..U+005F, and its character classes ignore %caseless
    _rule(r"(?:(?:www\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})"
          r"|(?:(?-i:[^ \t\n\f\r\"`'<>|.!?(){}\u002C-\u005F$])+\.)+(?:com|net|org|edu))"
          r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?"),
    _rule(r"(?:&lt;|<)?[a-z0-9][^ \t\n\f\r\"<>|(){}\u00A0]*@(?:[^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*"
          r"[^ \t\n\f\r\"<>|(){}.\u00A0]+(?:&gt;|>)?"),
    _rule(r"[@\uFF20][a-z_][a-z_0-9]*", rf"[#\uFF03]{_LETTER}+"),
    _rule(_REDAUX, action=lambda t: ([_quotes(t)], len(t)), context="(?-i:[^A-Za-z])"),
    _rule(rf"n{_APOS_ETC}t", action=lambda t: ([_quotes(t)], len(t))),
    _rule(r"\d{1,2}[-/]\d{1,2}[-/]\d{2,4}"),
    _rule(rf"[-+]?{_NUM}", action=_no_soft_hyphens),
    _rule(r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)"),
    _rule(r"(?:\d{1,4}[- \u00A0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}",  # "3 1/2" is one token, with a no-break space
          action=lambda t: ([t.replace(" ", "\u00A0")], len(t))),
    _rule(r"[\u00BC\u00BD\u00BE\u2153-\u215E]", action=lambda t: ([_FRACTIONS.get(t, t)], 1)),
    _rule(rf"-(?:rrb|lrb|rcb|lcb|rsb|lsb)-|c\.d\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls|cap{_APOS}n"
          rf"|c{_APOS}est", action=lambda t: ([t.replace("&amp;", "&")], len(t))),
    _rule(r"[a-z0-9]+(?:-[a-z]+){0,2}(?:\\?/[a-z0-9]+(?:-[a-z]+){0,2}){1,2}"),
    _rule(r"(?-i:[A-Z])*\$|#"),
    _rule(r"[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]", action=_currency),
    _rule(rf"{_ACRO}\.", action=_acronym_at_sentence_end, context=rf"{_SPACE_NL}+(?:{_NEXT_WORD}){_SPACE_NL}"),
    # the jar's ABBREV1 rule takes two characters of any kind as trailing context, so "etc." wins over "etc.-1" and
    # "jr.a" (equal length, earlier rule) but loses to the longer word "etc.dog"
    _rule(rf"(?:{_ABBREV1})\.", context=r"[\s\S]{2}"),
    _rule(rf"(?:{_ABBREV1})\."),
    _rule(rf"(?:{_ABBREV2})\."),
    _rule(rf"(?:{_ABBREV3})\.", context=rf"{_SPACE_NL}?\d"),
    _rule(rf"{_APOS}\d\d", context=_SPACE_NL),
    _rule(rf"{_WORD}\.", action=_no_soft_hyphens, context="[,;:]"),
    _rule(r"(?:\(\d{3}\)[ \u00A0]?|\d{3}[- \u00A0.])\d{3}[- \u00A0.]\d{4}", action=_phone),
    _rule(r"\"|&quot;", action=lambda t: (["``"], len(t)), context=r"[a-z0-9$]"),
    _rule(r"\"|&quot;", action=lambda t: (["''"], len(t))),
    _rule(r"[+%&\u2030\u2031~^|\\]"),
    _rule(r"[()\[\]{}]", action=lambda t: ([_BRACKETS[t]], 1)),
    _rule(r"<<|>>|<|>"),
    _rule(r"-+", action=_hyphens),
    _rule(r"\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026]", action=lambda t: (["..."], len(t))),
    _rule(r"@+|#+|_+|\*+|(?:\\\*){1,3}"),
    _rule(r"[,;:]|[?!]+|[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA]|=|/"),
    _rule(_HTHING + r"\.", context="[,;:]"),
    _rule(_HTHING, action=_no_soft_hyphens),
    _rule(_THING + r"\.", context="[,;:]"),
    _rule(_THING),
    _rule(_THINGA + r"\.", context="[,;:]"),
    _rule(_THINGA, action=lambda t: ([t.replace("&amp;", "&")], len(t))),
    _rule("'", action=lambda t: (["`"], 1), context=r"[a-z][^ \t\n\r\u00A0]"),
    _rule(_REDAUX, action=lambda t: ([_quotes(t)], len(t))),
    _rule(_APOS, "''", "[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091-\u0094\u201E\u201F\u2039\u203A\u00AB\u00BB]{1,2}",
          action=lambda t: ([_quotes(t)], len(t))),
    _rule(_MISC_SYMBOL),
    _rule(r"[-^=~<>']_[-^=~<>']", r"\([-^=~<>'][_.]?[-^=~<>']\)", r"\([\^=~<>']-[\^=~<>'`]\)",  # "^_^"
          action=lambda t: ([t.replace("(", "-LRB-").replace(")", "-RRB-")], len(t))),
    # smileys: ":)" comes out as ":-RRB-"
    _rule(r"[<>]?[:;=](?-i:[-o*'])?(?-i:[()DPdpO\\{@|\[\]])", context="(?-i:[^A-Za-z0-9])",
          action=lambda t: ([t.replace("(", "-LRB-").replace(")", "-RRB-")], len(t))),
    # the jar breaks lines at \r, \f, \v, U+2028 and U+2029 too; inside one caption they are spaces here
    _rule(r"[\x00 \t\n\r\f\v\u00A0\u2000-\u200B\u200E\u200F\u2028\u2029\u3000\uFEFF]+", action=lambda t: ([], len(t))),
]
_BLANKS = re.compile(r"[ \n]+")  # no token starts with a space, so the whitespace rule is the only match
_PLAIN_WORD = re.compile(r"[a-zA-Z]+(?=[ \n]|\Z)")
_SPLIT_WORDS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])


def _lex(text: str) -> list[tuple[int, str]]:
    """(start offset, token) for each token of `text`, before lowercasing and punctuation removal."""
    tokens = []
    pos = 0
    while pos < len(text):
        blanks = _BLANKS.match(text, pos)
        if blanks:
            pos = blanks.end()
            continue
        plain = _PLAIN_WORD.match(text, pos)
        if plain and plain.group().lower() not in _SPLIT_WORDS:  # fast path: no other rule can match longer
            tokens.append((pos, plain.group()))
            pos = plain.end()
            continue
        best, best_len = None, 0
        for patterns, action in _RULES:
            for pattern in patterns:
                match = pattern.match(text, pos)
                if match is not None and match.end() - pos > best_len:
                    best, best_len = (match.group("t"), action), match.end() - pos
        if best is None:  # a character the jar cannot tokenise: it deletes it
            pos += 1
            continue
        token, action = best
        emitted, consumed = action(token) if action else ([token], len(token))
        tokens.extend((pos, t) for t in emitted)
        pos += consumed
    return tokens


def _finish(tokens: list[str]) -> str:
    lowered = (token.lower() for token in tokens)
    return " ".join(token for token in lowered if token and token not in PUNCTUATIONS)  # "" was soft hyphens only


def ptb_tokenize_batch(captions: Sequence[str]) -> list[str]:
    """Tokenise captions as pycocoevalcap's PTBTokenizer does one batch: joined by newlines (a newline inside a
    caption becomes a space), PTB-tokenised, lowercased, PUNCTUATIONS dropped, tokens joined by single spaces."""
    text = "\n".join(caption.replace("\n", " ") for caption in captions)
    line_starts = [0] + [index + 1 for index, char in enumerate(text) if char == "\n"]
    lines: list[list[str]] = [[] for _ in captions]
    for start, token in _lex(text):
        lines[bisect.bisect_right(line_starts, start) - 1].append(token)
    return [_finish(tokens) for tokens in lines]


def ptb_tokenize(text: str) -> str:
    """One caption tokenised as pycocoevalcap's PTBTokenizer does:
    "A man's (red) hat." -> "a man 's -lrb- red -rrb- hat"."""
    return ptb_tokenize_batch([text])[0]


# --------------------------------------------------------------------------------------------------------------------
# Scorers: pycocoevalcap's Bleu, Rouge and Cider on tokenised captions
# --------------------------------------------------------------------------------------------------------------------

def _ids(references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str]) -> list:
    """The ids to score, in the references' order, after checking both sides cover the same ids."""
    def show(ids):
        return ", ".join(repr(i) for i in ids[:5]) + (f", ... ({len(ids)} in all)" if len(ids) > 5 else "")

    no_candidate = [i for i in references if i not in candidates]
    no_reference = [i for i in candidates if i not in references]
    if no_candidate or no_reference:
        parts = []
        if no_candidate:
            parts.append(f"ids with references but no candidate: {show(no_candidate)}")
        if no_reference:
            parts.append(f"ids with a candidate but no references: {show(no_reference)}")
        raise ValueError("candidates and references must cover the same ids; " + "; ".join(parts))
    if not references:
        raise ValueError("no captions to evaluate: references and candidates are empty")
    not_str = [i for i in references if not isinstance(candidates[i], str)]
    if not_str:
        raise TypeError(f"each candidate must be one caption (str); not so for ids: {show(not_str)}")
    bad_refs = [i for i in references if isinstance(references[i], str)
                or not all(isinstance(ref, str) for ref in references[i])]
    if bad_refs:
        raise TypeError(f"each id's references must be a list of str; not so for ids: {show(bad_refs)}")
    empty = [i for i in references if len(references[i]) == 0]
    if empty:
        raise ValueError(f"empty reference list for ids: {show(empty)}")
    return list(references)


def _ngram_counts(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str], n: int = 4
         ) -> dict[str, float]:
    """Corpus BLEU-1..n as pycocoevalcap's Bleu: clipped n-gram counts summed over images, the brevity penalty from the
    reference length closest to each candidate's (the shorter on a tie), and its 1e-15 / 1e-9 guards."""
    small, tiny = 1e-9, 1e-15  # pycocoevalcap's: a zero count gives a zero score, never a division by zero
    guess, correct = [0] * n, [0] * n
    test_len = ref_len = 0
    for i in _ids(references, candidates):
        words = candidates[i].split()
        max_ref_counts: dict[tuple, int] = {}
        ref_lens = []
        for ref in references[i]:
            ref_words = ref.split()
            ref_lens.append(len(ref_words))
            for ngram, count in _ngram_counts(ref_words, n).items():
                max_ref_counts[ngram] = max(max_ref_counts.get(ngram, 0), count)
        test_len += len(words)
        ref_len += min((abs(length - len(words)), length) for length in ref_lens)[1]
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        for ngram, count in _ngram_counts(words, n).items():
            correct[len(ngram) - 1] += min(max_ref_counts.get(ngram, 0), count)
    ratio = (test_len + tiny) / (ref_len + small)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, product = {}, 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores[f"Bleu_{k + 1}"] = product ** (1 / (k + 1)) * brevity
    return scores


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str], beta: float = 1.2
            ) -> float:
    """Mean over images of ROUGE-L F (beta 1.2) from the best LCS precision and recall over the references, as
    pycocoevalcap's Rouge (which splits on single spaces, so an empty caption is one empty token)."""
    scores = []
    for i in _ids(references, candidates):
        words = candidates[i].split(" ")
        precision = recall = 0.0
        for ref in references[i]:
            ref_words = ref.split(" ")
            lcs = _lcs_length(ref_words, words)
            precision = max(precision, lcs / len(words))
            recall = max(recall, lcs / len(ref_words))
        if precision != 0 and recall != 0:
            scores.append((1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision))
        else:
            scores.append(0.0)
    return sum(scores) / len(scores)


def cider(references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str], n: int = 4,
          sigma: float = 6.0) -> float:
    """CIDEr-D as pycocoevalcap's Cider: tf-idf n-gram vectors (n = 1..4) with document frequencies from the references
    of the images scored here, candidate weights clipped by the reference's, a Gaussian length penalty (sigma 6), the
    mean over n-gram orders and references, times 10, averaged over images."""
    ids = _ids(references, candidates)
    ref_counts = [[_ngram_counts(ref.split(), n) for ref in references[i]] for i in ids]
    document_frequency: Counter = Counter()
    for refs in ref_counts:
        document_frequency.update({ngram for counts in refs for ngram in counts})
    log_images = math.log(len(ids))  # one image: every idf is 0, and so is CIDEr

    def tfidf(counts: Counter) -> tuple[list[dict], list[float], int]:
        vector: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for ngram, term_frequency in counts.items():
            k = len(ngram) - 1
            weight = term_frequency * (log_images - math.log(max(1.0, document_frequency[ngram])))
            vector[k][ngram] = weight
            norm[k] += weight ** 2
            if k == 1:  # pycocoevalcap's "length" counts bigrams: the same differences as word counts, except
                length += term_frequency  # for an empty caption, whose zero vector scores 0 whatever the penalty
        return vector, [math.sqrt(x) for x in norm], length

    scores = []
    for i, refs in zip(ids, ref_counts):
        vector, norm, length = tfidf(_ngram_counts(candidates[i].split(), n))
        total = [0.0] * n
        for counts in refs:
            ref_vector, ref_norm, ref_length = tfidf(counts)
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                value = 0.0
                for ngram, weight in vector[k].items():
                    ref_weight = ref_vector[k].get(ngram, 0.0)
                    value += min(weight, ref_weight) * ref_weight
                if norm[k] != 0 and ref_norm[k] != 0:
                    value /= norm[k] * ref_norm[k]
                total[k] += value * penalty
        scores.append(sum(total) / n / len(refs) * 10.0)
    return sum(scores) / len(scores)


def caption_metrics(references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str], *,
                    tokenize: bool = True) -> dict[str, float]:
    """Bleu_1..4, ROUGE_L and CIDEr as raw fractions (COCO's numbers), plus agg_metrics = CIDEr + Bleu_4 (how LAVIS
    picks caption checkpoints). Raw captions are PTB-tokenised first unless `tokenize=False`."""
    ids = _ids(references, candidates)
    if tokenize:
        # two batches, references then candidates, as COCOEvalCap tokenises them (see ptb_tokenize_batch)
        flat_refs = ptb_tokenize_batch([ref for i in ids for ref in references[i]])
        tokenized_refs, start = {}, 0
        for i in ids:
            tokenized_refs[i] = flat_refs[start:start + len(references[i])]
            start += len(references[i])
        references = tokenized_refs
        candidates = dict(zip(ids, ptb_tokenize_batch([candidates[i] for i in ids])))
    result = bleu(references, candidates)
    result["ROUGE_L"] = rouge_l(references, candidates)
    result["CIDEr"] = cider(references, candidates)
    result["agg_metrics"] = result["CIDEr"] + result["Bleu_4"]
    return result
