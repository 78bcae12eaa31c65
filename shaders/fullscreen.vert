#version 330
// A full-screen triangle pair. uv (0,0) is the image's top-left: every internal texture
// stores row 0 = top, so passes never flip; only present.frag flips for the window.
in vec2 in_pos;
out vec2 uv;
void main() {
    uv = in_pos * 0.5 + 0.5;
    gl_Position = vec4(in_pos, 0.0, 1.0);
}
