package io.fedq.participant;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;

/** Reads the fenced blocks of docs/*.md, so the tests use the documents' own vectors. */
final class Docs {
    private Docs() {}

    static Path dir() {
        String d = System.getProperty("fedq.docs");
        return Path.of(d != null ? d : "../../docs");
    }

    static String read(String page) {
        try {
            return Files.readString(dir().resolve(page), StandardCharsets.UTF_8);
        } catch (IOException e) {
            throw new AssertionError("cannot read docs/" + page + ": " + e.getMessage());
        }
    }

    /** Every fenced block of {@code page} whose info string is {@code info}, in order. */
    static List<String> blocks(String page, String info) {
        List<String> out = new ArrayList<>();
        String[] lines = read(page).split("\n", -1);
        for (int i = 0; i < lines.length; i++) {
            if (!lines[i].startsWith("```")) {
                continue;
            }
            String found = lines[i].substring(3);
            StringBuilder sb = new StringBuilder();
            int j = i + 1;
            while (j < lines.length && !lines[j].equals("```")) {
                sb.append(lines[j]).append('\n');
                j++;
            }
            if (found.equals(info)) {
                out.add(sb.toString());
            }
            i = j;
        }
        if (out.isEmpty()) {
            throw new AssertionError("docs/" + page + " has no ```" + info + " block");
        }
        return out;
    }

    static String block(String page, String info) {
        List<String> b = blocks(page, info);
        if (b.size() != 1) {
            throw new AssertionError("docs/" + page + " has " + b.size() + " ```" + info + " blocks");
        }
        return b.get(0);
    }

    /** In a block of "label: value" lines, the value of {@code label} (or the next line when the value is empty). */
    static String value(String block, String label) {
        String[] lines = block.split("\n");
        for (int i = 0; i < lines.length; i++) {
            if (lines[i].startsWith(label + ":")) {
                String v = lines[i].substring(label.length() + 1).trim();
                return v.isEmpty() ? lines[i + 1].trim() : v;
            }
        }
        throw new AssertionError("no line '" + label + ":' in the block");
    }

    /** The first line starting with {@code prefix} (and the next line's hex, for "... message (N bytes):"). */
    static String after(String block, String prefix) {
        String[] lines = block.split("\n");
        for (int i = 0; i < lines.length; i++) {
            if (lines[i].startsWith(prefix)) {
                String rest = lines[i].substring(lines[i].indexOf(':') + 1).trim();
                return rest.isEmpty() ? lines[i + 1].trim() : rest;
            }
        }
        throw new AssertionError("no line starting '" + prefix + "' in the block");
    }
}
