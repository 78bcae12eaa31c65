#version 330
// The HUD text panel (RGBA, premultiplied by nothing), drawn with alpha blending.
uniform sampler2D u_input;
in vec2 uv;
out vec4 frag;
void main() {
    frag = texture(u_input, vec2(uv.x, 1.0 - uv.y));
}
